"""The Snapshotter: a VM's frozen instant into a borg archive, through a transient VirtualBox snapshot.

A run, step by step (each step in a module of its own where it is more than a call):

1. **Lock** (:mod:`._lock`): the VM's host-local lock, held for the whole run.
2. **Leftovers**: transient snapshots of crashed earlier runs (the reserved
   name prefix; with the lock held, none can be a live run's) are deleted.
3. **Snapshot**: the mode is chosen from the VM's state; a transient
   snapshot freezes the disks (and the RAM, online) at one instant. For
   ``migrate`` the VM's state is saved first.
4. **Archive** (:mod:`._collect`): the settings file read right after the
   take, rewritten by ``freeze_instant`` to describe the instant and by
   ``relocate`` to refer only to paths in the VM folder, is stored with every
   file it names: the frozen disks, saved states, NVRAM. DVD and floppy
   images are referred to by their absolute paths, not stored.
5. **Merge**: the transient snapshot is deleted, in a ``finally``; a failed
   delete after a committed archive raises :class:`TransientSnapshotLeft`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import time
import uuid as uuid_module
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from attrs import define, field

from .._errors import (
    ArchiveExists,
    ConfigurationError,
    InvalidVMState,
    SnapshotError,
    TransientSnapshotLeft,
    VBRemoteError,
)
from .._hostinfo import cpu_vendor
from .._models import (
    FileRole,
    FileSpec,
    MachineState,
    Progress,
    SnapshotInfo,
    SnapshotMetadata,
    SnapshotMode,
    VMInfo,
    WriteResult,
)
from .._repository import DEFAULT_CHECKPOINT_INTERVAL, Repository
from .._settings import freeze_instant, parse_settings, relocate
from .._vbox import VirtualBoxHost
from ._collect import Collected, anchor_images, collect
from ._lock import check_lock_wait, state_dir_or_default, vm_lock
from ._results import SnapshotResult, SnapshotStats

__all__ = [
    "DEFAULT_NAME_TEMPLATE",
    "TRANSIENT_PREFIX",
    "SnapshotResult",
    "SnapshotStats",
    "Snapshotter",
]

log = logging.getLogger("vbremote.snapshot")

#: The name prefix reserved for vbremote's transient snapshots. A snapshot
#: whose name starts with it, found while no run holds the VM's lock, is the
#: leftover of a crashed run and is deleted.
TRANSIENT_PREFIX = "vbremote-transient-"

#: The default archive name: VM name, the instant (UTC) and the mode.
DEFAULT_NAME_TEMPLATE = "{vm}-{time:%Y-%m-%dT%H.%M.%S}-{mode}"

#: The states in which a VM has no process: snapshots of them are offline.
_OFFLINE_STATES = (
    MachineState.POWERED_OFF,
    MachineState.ABORTED,
    MachineState.SAVED,
    MachineState.ABORTED_SAVED,
)
# Transient states that end on their own; the run waits this long for them.
_SETTLE_SECONDS = 30.0

ProgressCallback = Callable[[Progress], None]
ModeArg = SnapshotMode | Literal["auto", "online", "offline", "migrate"]


def _check_template(template: str) -> str:
    try:
        sample = template.format(
            vm="vm", uuid="00000000-0000-0000-0000-000000000000", time=datetime.now(UTC), mode="online", run="0"
        )
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise ConfigurationError(
            f"bad name template {template!r}: {exc!r} (fields: vm, uuid, time, mode, run)"
        ) from exc
    if not sample.strip() or "/" in sample:
        raise ConfigurationError(f"name template {template!r} gives an empty name or one with '/'")
    return template


@define(eq=False)
class Snapshotter:
    """Takes snapshots of VMs into a repository.

    Args:
        host: The VirtualBox host the VMs run on.
        repository: The open repository the archives go to.
        name_template: The archive name, as a :meth:`str.format` template
            with the fields ``vm`` (name), ``uuid``, ``time`` (the instant, a
            UTC :class:`~datetime.datetime`), ``mode`` (``online``,
            ``offline``, ``migrate``) and ``run`` (the run id). When the name
            is taken (two snapshots in one second), ``-2``, ``-3`` … is added.
        state_dir: vbremote's state folder, which holds the per-VM lock files
            and, during a run, the VM's work folder ``work/<vm uuid>`` (default: ``$XDG_STATE_HOME/vbremote``, else
            ``~/.local/state/vbremote``).
        lock_wait: Seconds to wait when another run holds the VM's lock
            (default: do not wait).
        checkpoint_interval: Seconds between the checkpoint archives written
            while the files are stored (default
            :data:`~vbremote.DEFAULT_CHECKPOINT_INTERVAL`), or ``None`` for
            none; see :meth:`Repository.write_archive
            <vbremote.Repository.write_archive>`. After a crash the next run
            sends only what the last checkpoint did not hold; a run's archive
            commit removes the checkpoints of the VM's earlier runs.

    Raises:
        ConfigurationError: A bad name template, a negative ``lock_wait`` or
            a ``checkpoint_interval`` that is not a positive number of seconds.
    """

    host: VirtualBoxHost
    repository: Repository
    name_template: str = field(default=DEFAULT_NAME_TEMPLATE, converter=_check_template, kw_only=True)
    state_dir: Path = field(default=None, converter=state_dir_or_default, kw_only=True)
    lock_wait: float = field(default=0.0, kw_only=True)
    checkpoint_interval: float | None = field(default=DEFAULT_CHECKPOINT_INTERVAL, kw_only=True)

    def __attrs_post_init__(self) -> None:
        check_lock_wait(self.lock_wait)
        interval = self.checkpoint_interval
        if interval is not None and (
            isinstance(interval, bool) or not isinstance(interval, int | float) or not 0 < interval < float("inf")
        ):
            raise ConfigurationError(
                f"checkpoint_interval must be a positive number of seconds or None, not {interval!r}"
            )

    def take(
        self,
        vm: str | VMInfo,
        mode: ModeArg = "auto",
        labels: Iterable[str] = (),
        progress: ProgressCallback | None = None,
    ) -> SnapshotResult:
        """Snapshot a VM into a new archive.

        Modes: ``"auto"`` takes an online snapshot of a Running VM (a live
        snapshot: the guest keeps running) or of a Paused one (it stays
        paused), and an offline one of a PoweredOff, Aborted, Saved or
        AbortedSaved VM. ``"online"`` and ``"offline"`` insist on one of the
        two. ``"migrate"`` saves the state of a running or paused VM, archives
        it and leaves it Saved, for another host to resume (also when the run
        fails after saving); on a VM that is not running it is an offline
        snapshot.

        Args:
            vm: The VM's name or uuid.
            mode: ``"auto"``, a :class:`SnapshotMode` or its value.
            labels: Labels for the archive (retention can keep by label).
            progress: Called with :class:`Progress` events whose
                ``operation`` is the phase: ``locking``, ``leftovers``
                (``done``/``total`` in snapshots), ``snapshot``, ``archive``
                (``path``, ``done``/``total`` in bytes of that file),
                ``checkpoint`` (a checkpoint archive committed while
                ``path`` was stored, ``done`` bytes of it in) and ``merge``
                (``done``/``total`` in percent). Raising from it
                cancels the run: the transient snapshot is deleted and no
                archive is committed (the repository stays usable).

        Returns:
            The archive, the mode used, the costs and the leftovers removed.

        Raises:
            ConfigurationError: A bad mode or label.
            VMNotFound: No such VM.
            InvalidVMState: The VM is in a transient state, or in a state the
                mode asked for does not allow; nothing was written.
            SnapshotInProgress: Another run holds the VM's lock.
            VirtualBoxError: VirtualBox refused or failed the snapshot (e.g.
                ``VMLocked``); nothing was written.
            RepositoryError: Writing the archive failed; the transient
                snapshot was deleted and nothing was committed.
            TransientSnapshotLeft: The archive committed but the transient
                snapshot could not be deleted (it carries both), or a
                leftover of an earlier run could not be deleted.
        """
        wanted = _mode(mode)
        label_set = SnapshotMetadata(vm_name="-", vm_uuid=str(uuid_module.UUID(int=0)), labels=labels).labels
        emit = _Emitter(progress)
        info = self.host.vm(vm)
        emit("locking", info.name, 0, 1)
        with vm_lock(self.state_dir, info.uuid, wait=self.lock_wait, vm=info.name):
            emit("locking", info.name, 1, 1)
            log.debug("%s: holding the snapshot lock", info.name)
            shutil.rmtree(self._scratch(info.uuid), ignore_errors=True)  # what a killed run left
            # Read again under the lock: a run that held it until now has
            # deleted its transient snapshot, which must not look like a leftover.
            leftovers = self._remove_leftovers(self.host.vm(info.uuid), emit)
            return self._run(self.host.vm(info.uuid), wanted, label_set, leftovers, emit)

    # -- leftovers --------------------------------------------------------------------

    def _remove_leftovers(self, info: VMInfo, emit: _Emitter) -> tuple[SnapshotInfo, ...]:
        found = [s for s in info.snapshots() if s.name.startswith(TRANSIENT_PREFIX)]
        emit("leftovers", info.name, 0, len(found))
        removed = []
        # Youngest first: a leftover with a leftover child (two crashed runs in a row) goes child first.
        for number, snapshot in enumerate(sorted(found, key=lambda s: s.taken, reverse=True), 1):
            log.warning("%s: deleting transient snapshot %s (%s) left by a crashed run", info.name,
                        snapshot.name, snapshot.uuid)
            try:
                self.host.delete_snapshot(info.uuid, snapshot.uuid)
            except VBRemoteError as exc:
                raise TransientSnapshotLeft(
                    f"{info.name}: the transient snapshot {snapshot.name} ({snapshot.uuid}) of an earlier run could"
                    f" not be deleted: {exc}. Delete it (VBoxManage snapshot {info.uuid} delete {snapshot.uuid})"
                    " or fix the cause, then snapshot again",
                    vm=info.name, snapshot=snapshot.uuid, snapshot_name=snapshot.name, archive=None,
                ) from exc
            removed.append(snapshot)
            emit("leftovers", info.name, number, len(found))
        return tuple(removed)

    # -- one run --------------------------------------------------------------------

    def _run(
        self,
        info: VMInfo,
        wanted: SnapshotMode | None,
        labels: frozenset[str],
        leftovers: tuple[SnapshotInfo, ...],
        emit: _Emitter,
    ) -> SnapshotResult:
        mode, live = _plan(info, wanted)
        run_id = uuid_module.uuid4().hex[:16]
        name = TRANSIENT_PREFIX + run_id
        description = (
            f"Transient snapshot of vbremote ({mode.value} snapshot run {run_id}, process {os.getpid()} on"
            f" {socket.gethostname()}, started {datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ}). The run deletes it when"
            " its archive is written; if it is still here, the run crashed and the next one deletes it."
        )
        started = time.monotonic()
        if mode is SnapshotMode.MIGRATE and info.state.is_running:
            log.info("%s: saving the state for migration", info.name)
            emit("snapshot", info.name, 0, 100)
            self.host.save_state(info.uuid)
        snapshot: SnapshotInfo | None = None
        committed: WriteResult | None = None
        seconds = {"snapshot": 0.0, "archive": 0.0, "merge": 0.0}
        taken_at = 0.0
        try:
            log.info("%s: taking transient snapshot %s (%s%s)", info.name, name, mode.value,
                     ", live" if live else "")
            emit("snapshot", info.name, 0, 100)
            snapshot = self.host.take_snapshot(
                info.uuid, name, description=description, live=live,
                on_progress=lambda p: emit("snapshot", info.name, p.done, p.total),
            )
            taken_at = time.monotonic()
            seconds["snapshot"] = taken_at - started
            committed = self._archive(info, snapshot, mode, labels, emit)
            seconds["archive"] = time.monotonic() - taken_at
        except BaseException as exc:
            self._delete_after_failure(info, name, snapshot, exc)
            raise
        merge_started = time.monotonic()
        self._delete(info, snapshot, committed, emit)
        seconds["merge"] = time.monotonic() - merge_started
        state = self.host.state(info.uuid)
        if mode is not SnapshotMode.MIGRATE and state is not info.state:
            log.warning("%s: was %s, is %s after the snapshot; the archive holds the instant of %s",
                        info.name, info.state.value, state.value, snapshot.taken.isoformat())
        stats = SnapshotStats(
            bytes_read=committed.bytes_read,
            bytes_new=committed.bytes_new,
            bytes_stored=committed.bytes_stored,
            chunks=committed.chunks,
            chunks_new=committed.chunks_new,
            chunks_zero=committed.chunks_zero,
            seconds_snapshot=seconds["snapshot"],
            seconds_archive=seconds["archive"],
            seconds_merge=seconds["merge"],
            seconds_transient=time.monotonic() - taken_at,
        )
        log.info("%s: archive %s written (%d bytes read, %d new, %d stored)", info.name, committed.archive.name,
                 stats.bytes_read, stats.bytes_new, stats.bytes_stored)
        return SnapshotResult(archive=committed.archive, mode=mode, stats=stats, leftovers=leftovers,
                              vm_state=state)

    def _archive(
        self, info: VMInfo, snapshot: SnapshotInfo, mode: SnapshotMode, labels: frozenset[str], emit: _Emitter
    ) -> WriteResult:
        folder = info.settings_file.parent.absolute()
        # The settings file as VirtualBox wrote it at the end of the take
        # (SessionMachine::i_finishTakingSnapshot saves the settings before the
        # progress completes, SnapshotImpl.cpp of 7.1.12): the transient
        # snapshot is its current snapshot, with the frozen hardware.
        frozen = freeze_instant(info.settings_file.read_bytes(), snapshot.uuid)
        collected = collect(parse_settings(frozen), folder, vm=info.name)
        settings = relocate(frozen, old_folder=str(folder), external=collected.external)
        settings, images = anchor_images(settings, folder)
        for image in images:
            log.info("%s: DVD/floppy image %s is referred to, not archived", info.name, image)
        metadata = self._metadata(info, snapshot, mode, labels, collected)
        # The archived settings are written to a folder of this VM's under the state folder, used
        # only under the VM's lock: what a killed run left there, the next run removes (take()).
        private = self._scratch(info.uuid)
        try:
            private.mkdir(parents=True, mode=0o700)
            settings_copy = private / info.settings_file.name
            settings_copy.write_bytes(settings)
        except OSError as exc:
            shutil.rmtree(private, ignore_errors=True)
            raise ConfigurationError(f"cannot use the state folder {self.state_dir}: {exc}") from exc
        try:
            files = [FileSpec(settings_copy, info.settings_file.name, FileRole.SETTINGS), *collected.files]
            sizes = {spec.path: spec.source.stat().st_size for spec in files}
            log.info("%s: archiving %d files, %d bytes", info.name, len(files), sum(sizes.values()))
            return self._write(info, snapshot, mode, files, metadata, _ArchiveProgress(emit, files, sizes))
        finally:
            shutil.rmtree(private, ignore_errors=True)

    def _scratch(self, vm_uuid: str) -> Path:
        """This VM's private work folder: a folder named by its uuid in the state folder's ``work``, used under
        its lock only."""
        return self.state_dir / "work" / vm_uuid

    def _write(
        self,
        info: VMInfo,
        snapshot: SnapshotInfo,
        mode: SnapshotMode,
        files: list[FileSpec],
        metadata: SnapshotMetadata,
        progress: Callable[[Progress], None],
    ) -> WriteResult:
        base = self.name_template.format(vm=info.name, uuid=info.uuid, time=snapshot.taken, mode=mode.value,
                                         run=snapshot.name.removeprefix(TRANSIENT_PREFIX))
        for number in range(1, 1000):
            name = base if number == 1 else f"{base}-{number}"
            try:
                return self.repository.write_archive(name, files, metadata, timestamp=snapshot.taken,
                                                     progress=progress,
                                                     checkpoint_interval=self.checkpoint_interval)
            except ArchiveExists:
                log.debug("archive name %s is taken", name)
        raise SnapshotError(f"{info.name}: archive names {base}, {base}-2 … {base}-999 are all taken",
                            vm=info.name)

    def _metadata(
        self,
        info: VMInfo,
        snapshot: SnapshotInfo,
        mode: SnapshotMode,
        labels: frozenset[str],
        collected: Collected,
    ) -> SnapshotMetadata:
        return SnapshotMetadata(
            vm_name=info.name,
            vm_uuid=info.uuid,
            mode=mode,
            vbox_version=self.host.version,
            host=socket.gethostname(),
            cpu_vendor=cpu_vendor(),
            cpu_portability=info.cpu_portability_level,
            labels=labels,
            taken=snapshot.taken,
            external={path: written for written, path in collected.external.items()},
        )

    # -- deleting the transient snapshot ------------------------------------------------

    def _delete(self, info: VMInfo, snapshot: SnapshotInfo, committed: WriteResult, emit: _Emitter) -> None:
        log.info("%s: deleting transient snapshot %s", info.name, snapshot.name)
        emit("merge", info.name, 0, 100)
        try:
            self.host.delete_snapshot(info.uuid, snapshot.uuid,
                                      on_progress=lambda p: emit("merge", info.name, p.done, p.total))
        except VBRemoteError as exc:
            raise TransientSnapshotLeft(
                f"{info.name}: archive {committed.archive.name} is committed, but the transient snapshot"
                f" {snapshot.name} ({snapshot.uuid}) could not be deleted: {exc}. The VM keeps its differencing"
                " images until it is deleted: the next snapshot run deletes it, or delete it now"
                f" (VBoxManage snapshot {info.uuid} delete {snapshot.uuid})",
                vm=info.name, snapshot=snapshot.uuid, snapshot_name=snapshot.name, archive=committed.archive,
            ) from exc
        emit("merge", info.name, 100, 100)

    def _delete_after_failure(self, info: VMInfo, name: str, snapshot: SnapshotInfo | None,
                              error: BaseException) -> None:
        """Delete this run's snapshot after a failure; the failure is what the caller sees."""
        if snapshot is not None:
            uuid: str | None = snapshot.uuid
        else:
            # Once VirtualBox accepted the request, take_snapshot's errors name
            # the snapshot asked for; it may exist or not (an interrupted online
            # take is canceled). A vbremote error without one: none was asked for.
            requested = getattr(error, "snapshot_id", None)
            if requested is None and isinstance(error, VBRemoteError):
                return
            uuid = self._find_own(info, name, requested)
        if uuid is None:
            return
        log.info("%s: run failed (%s); deleting transient snapshot %s", info.name, type(error).__name__, name)
        try:
            self.host.delete_snapshot(info.uuid, uuid)
        except VBRemoteError as exc:
            log.error("%s: the transient snapshot %s (%s) could not be deleted: %s; the next run deletes it",
                      info.name, name, uuid, exc)
            error.add_note(
                f"The transient snapshot {name} ({uuid}) of {info.name} could not be deleted ({exc}); the next"
                " snapshot run deletes it."
            )

    def _find_own(self, info: VMInfo, name: str, requested: str | None) -> str | None:
        """This run's snapshot, when the take failed or was interrupted before it returned (it may exist)."""
        with contextlib.suppress(VBRemoteError):
            deadline = time.monotonic() + _SETTLE_SECONDS
            while time.monotonic() < deadline:
                current = self.host.vm(info.uuid)
                if current.state not in _TAKING_STATES:
                    for snapshot in current.snapshots():
                        if snapshot.uuid == requested or snapshot.name == name:
                            return snapshot.uuid
                    return None
                time.sleep(0.05)
        return None


_TAKING_STATES = (
    MachineState.SNAPSHOTTING,
    MachineState.LIVE_SNAPSHOTTING,
    MachineState.ONLINE_SNAPSHOTTING,
    MachineState.SAVING,
)


def _mode(value: object) -> SnapshotMode | None:
    if value == "auto":
        return None
    if isinstance(value, SnapshotMode):
        return value
    try:
        return SnapshotMode(value)
    except ValueError:
        raise ConfigurationError(
            f"mode must be 'auto', 'online', 'offline' or 'migrate', not {value!r}"
        ) from None


def _plan(info: VMInfo, wanted: SnapshotMode | None) -> tuple[SnapshotMode, bool | None]:
    """The mode a run uses on a VM in ``info.state``, and whether the snapshot is live (``take_snapshot(live=)``)."""
    state = info.state
    if state.is_running:
        if wanted is SnapshotMode.OFFLINE:
            raise InvalidVMState(
                f"{info.name} is {state.value}: an offline snapshot needs it powered off or saved"
                " (use 'online' or 'migrate')",
                vm=info.name, state=state,
            )
        if wanted is SnapshotMode.MIGRATE:
            return SnapshotMode.MIGRATE, None  # the state is saved first: an offline take of a Saved VM
        # A Running VM gets a live snapshot (the guest runs on). VirtualBox
        # 7.0.10 and later refuse a live snapshot of a VM that is not Running
        # (SessionMachine::takeSnapshot, SnapshotImpl.cpp): a Paused VM's
        # snapshot pauses (it stays paused).
        return SnapshotMode.ONLINE, state is MachineState.RUNNING
    if state in _OFFLINE_STATES:
        if wanted is SnapshotMode.ONLINE:
            raise InvalidVMState(
                f"{info.name} is {state.value}: an online snapshot needs it running or paused",
                vm=info.name, state=state,
            )
        return SnapshotMode.OFFLINE, None
    raise InvalidVMState(
        f"{info.name} is {state.value}, a state it is changing from: try again when it has settled",
        vm=info.name, state=state,
    )


class _Emitter:
    """Sends phase events to the caller's callback (if any)."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self._callback = callback

    def __call__(self, operation: str, path: str, done: int, total: int) -> None:
        if self._callback is not None:
            self._callback(Progress(operation=operation, path=path, done=done, total=total))


class _ArchiveProgress:
    """Turns the repository's running byte count into per-file ``archive`` (and ``checkpoint``) events."""

    def __init__(self, emit: _Emitter, files: list[FileSpec], sizes: dict[str, int]) -> None:
        self._emit = emit
        self._starts: dict[str, int] = {}
        offset = 0
        for spec in files:
            self._starts[spec.path] = offset
            offset += sizes[spec.path]
        self._sizes = sizes

    def __call__(self, event: Progress) -> None:
        start = self._starts.get(event.path, 0)
        size = self._sizes.get(event.path, 0)
        operation = "checkpoint" if event.operation == "checkpoint" else "archive"
        self._emit(operation, event.path, max(0, min(size, event.done - start)), size)
