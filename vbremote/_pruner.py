"""The Pruner: applies a retention policy to one VM's archives, safely."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from attrs import define, field, frozen

from ._errors import ConfigurationError, PruneRefused
from ._models import ArchiveInfo
from ._repository import Repository
from ._retention import RetentionPolicy

__all__ = ["PROTECTED_LABEL", "Guards", "PlanEntry", "PrunePlan", "PruneResult", "Pruner"]

#: Archives with this label are never pruned, whatever the policy says.
PROTECTED_LABEL = "protected"


def _min_keep(value: int) -> int:
    if value < 1:
        raise ConfigurationError("min_keep must be at least 1")
    return value


@frozen(kw_only=True)
class Guards:
    """Safety rules the Pruner applies on top of any policy. All are on by default.

    Args:
        keep_newest: Never prune a VM's newest archive.
        min_keep: Never leave fewer than this many archives of the VM.
        max_age: Refuse to prune when the VM's newest archive is older than
            this (backups have stopped, and history must not drain away);
            ``None`` turns the guard off.
    """

    keep_newest: bool = True
    min_keep: int = field(default=1, converter=_min_keep)
    max_age: timedelta | None = timedelta(days=30)


@frozen
class PlanEntry:
    """One archive in a prune plan.

    Attributes:
        archive: The archive.
        keep: Whether it stays.
        reason: Why (the policy's reason, ``"protected"`` or ``"guard: …"``).
    """

    archive: ArchiveInfo
    keep: bool
    reason: str


@frozen
class PrunePlan:
    """What pruning one VM would do.

    Attributes:
        vm: The VM asked for (name or uuid).
        now: The time the plan was made for.
        entries: Every archive of the VM, newest first, with its decision.
        refused: Why pruning is refused (a guard), or ``None``.
    """

    vm: str
    now: datetime
    entries: tuple[PlanEntry, ...]
    refused: str | None = None

    @property
    def keep(self) -> tuple[ArchiveInfo, ...]:
        """The archives that stay."""
        return tuple(e.archive for e in self.entries if e.keep)

    @property
    def prune(self) -> tuple[ArchiveInfo, ...]:
        """The archives that would be deleted."""
        return tuple(e.archive for e in self.entries if not e.keep)

    def table(self) -> str:
        """The plan as a plain-text table, for people."""
        lines = [f"{'archive':<40} {'time (UTC)':<19}  {'action':<6}  reason"]
        for e in self.entries:
            action = "keep" if e.keep else "prune"
            lines.append(f"{e.archive.name:<40} {e.archive.time:%Y-%m-%d %H:%M:%S}  {action:<6}  {e.reason}")
        if self.refused:
            lines.append(f"refused: {self.refused}")
        return "\n".join(lines)


@frozen
class PruneResult:
    """What pruning did.

    Attributes:
        plan: The plan that was carried out.
        deleted: Names of the archives deleted (empty for a dry run).
        freed_bytes: Space compaction freed, where it can be measured.
        append_only: Whether the repository is append-only, where known.
        dry_run: Nothing was changed.
    """

    plan: PrunePlan
    deleted: tuple[str, ...]
    freed_bytes: int | None
    append_only: bool | None
    dry_run: bool


@define(eq=False)
class Pruner:
    """Applies a retention policy to one VM's archives.

    It needs no VirtualBox: run it where the repository is reachable, typically
    on the storage server with a :class:`~vbremote.LocalTransport`.

    It sees only what :meth:`Repository.archives <vbremote.Repository.archives>`
    lists: an archive whose metadata fails validation is never deleted, and
    is not counted by the guards.

    Args:
        repository: An open repository.
        policy: Which archives to keep.
        guards: Safety rules on top of the policy.
        clock: Returns the current time (for tests); default: now, UTC.
    """

    repository: Repository
    policy: RetentionPolicy
    guards: Guards = field(factory=Guards, kw_only=True)
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC), kw_only=True)

    def plan(self, vm: str) -> PrunePlan:
        """Decide for every archive of ``vm`` (a name or uuid); changes nothing.

        Raises:
            ConfigurationError: The policy returned the wrong number of decisions,
                or the VM name is ambiguous.
        """
        return self._plan(vm, self.repository.archives(vm=vm), self.clock())

    def plan_all(self) -> dict[str, PrunePlan]:
        """Plan every VM in the repository from one listing; changes nothing.

        Returns:
            A plan per VM, keyed by the VM's uuid (each plan's ``vm`` is the uuid too).

        Raises:
            ConfigurationError: The policy returned the wrong number of decisions.
        """
        now = self.clock()
        by_vm: dict[str, list[ArchiveInfo]] = {}
        for archive in self.repository.archives():
            by_vm.setdefault(archive.vm_uuid, []).append(archive)
        return {uuid: self._plan(uuid, archives, now) for uuid, archives in by_vm.items()}

    def _plan(self, vm: str, archives: list[ArchiveInfo], now: datetime) -> PrunePlan:
        archives = sorted(archives, key=lambda a: a.time, reverse=True)
        decisions = list(self.policy.decide(archives, now))
        if len(decisions) != len(archives):
            raise ConfigurationError(
                f"{type(self.policy).__name__}.decide returned {len(decisions)} decisions for {len(archives)} archives"
            )
        entries = []
        for archive, decision in zip(archives, decisions, strict=True):
            if PROTECTED_LABEL in archive.metadata.labels:
                entries.append(PlanEntry(archive, True, "protected"))
            else:
                entries.append(PlanEntry(archive, decision.keep, decision.reason))
        if entries and self.guards.keep_newest and not entries[0].keep:
            entries[0] = PlanEntry(entries[0].archive, True, "guard: newest")
        kept = sum(e.keep for e in entries)
        for i, entry in enumerate(entries):
            if kept >= self.guards.min_keep:
                break
            if not entry.keep:
                entries[i] = PlanEntry(entry.archive, True, f"guard: min_keep {self.guards.min_keep}")
                kept += 1
        refused = None
        if archives and self.guards.max_age is not None and now - archives[0].time > self.guards.max_age:
            refused = (
                f"the newest archive of {vm!r} is from {archives[0].time:%Y-%m-%d %H:%M} UTC, older than"
                f" max_age {self.guards.max_age}: backups seem to have stopped"
            )
        return PrunePlan(vm=vm, now=now, entries=tuple(entries), refused=refused)

    def prune(self, vm: str, *, dry_run: bool = False) -> PruneResult:
        """Delete what the plan prunes, then compact.

        Args:
            vm: A VM name or uuid.
            dry_run: Only plan; change nothing.

        Raises:
            PruneRefused: A guard refused (``max_age``), or the repository is
                append-only, where deletes free nothing (prune on the server).
            RepositoryReadOnly: The repository was opened with ``read_only=True``
                and there is something to delete; nothing was deleted.
        """
        plan = self.plan(vm)
        if dry_run:
            return PruneResult(plan, (), None, self.repository.append_only, True)
        if plan.refused:
            raise PruneRefused(plan.refused, vm=vm)
        if not plan.prune:
            return PruneResult(plan, (), 0, self.repository.append_only, False)
        if self.repository.append_only:
            raise PruneRefused(
                "the repository is append-only: deletes there free no space and the server can roll them"
                " back; prune on the server with a local transport",
                vm=vm,
            )
        deleted = self.repository.delete_archives(plan.prune)
        compacted = self.repository.compact()
        return PruneResult(plan, deleted.deleted, compacted.freed_bytes, compacted.append_only, False)
