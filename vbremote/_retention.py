"""Retention policies: which of a VM's archives to keep.

A policy is a small object with one method, :meth:`RetentionPolicy.decide`,
that gets one VM's archives (newest first) and the current time, and returns
a :class:`Decision` (keep or not, and why) for each. :class:`KeepRules`
reproduces ``borg prune``'s rules exactly; :class:`KeepLabels` keeps labelled
archives; ``a | b`` keeps what either keeps.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, tzinfo

from attrs import field, frozen

from ._errors import ConfigurationError
from ._models import ArchiveInfo

__all__ = ["Decision", "KeepLabels", "KeepRules", "RetentionPolicy"]


@frozen
class Decision:
    """What a policy decided for one archive.

    Attributes:
        keep: Keep the archive.
        reason: Why, for people: ``"daily #3"``, ``"within 2:00:00"``, ``"label release"``, ``"no rule"``.
    """

    keep: bool
    reason: str


PRUNE = Decision(False, "no rule")


class RetentionPolicy(abc.ABC):
    """Decides which of one VM's archives to keep. Subclass it for your own rules.

    Policies compose: ``a | b`` keeps every archive that ``a`` or ``b`` keeps.
    """

    @abc.abstractmethod
    def decide(self, archives: Sequence[ArchiveInfo], now: datetime) -> Sequence[Decision]:
        """Decide for each archive.

        Args:
            archives: One VM's archives, newest first.
            now: The current time (timezone-aware, UTC).

        Returns:
            One decision per archive, in the same order.
        """

    def __or__(self, other: RetentionPolicy) -> RetentionPolicy:
        if not isinstance(other, RetentionPolicy):
            return NotImplemented
        return _Union((self, other))


@frozen
class _Union(RetentionPolicy):
    policies: tuple[RetentionPolicy, ...]

    def decide(self, archives: Sequence[ArchiveInfo], now: datetime) -> Sequence[Decision]:
        results = [list(p.decide(archives, now)) for p in self.policies]
        out = []
        for i in range(len(archives)):
            kept = [r[i] for r in results if r[i].keep]
            out.append(kept[0] if kept else PRUNE)
        return out

    def __or__(self, other: RetentionPolicy) -> RetentionPolicy:
        if not isinstance(other, RetentionPolicy):
            return NotImplemented
        return _Union((*self.policies, other))


def _count(value: int | None) -> int | None:
    if value is not None and value < 0:
        raise ConfigurationError("retention counts must be >= 0")
    return value


def _within(value: timedelta | None) -> timedelta | None:
    if value is not None and value <= timedelta(0):
        raise ConfigurationError("within must be a positive duration")
    return value


def _local_time(tz: tzinfo | None) -> Callable[[datetime], datetime]:
    if tz is not None:
        return lambda ts: ts.astimezone(tz).replace(tzinfo=None, microsecond=0)
    # Exactly as borg does it: the process's local time zone, to the second.
    return lambda ts: datetime(*time.localtime(ts.timestamp())[:6])


def _quarter_13weekly(local: datetime) -> object:
    year, week, _ = local.isocalendar()
    return (year, min(4, (week - 1) // 13 + 1))


def _quarter_3monthly(local: datetime) -> object:
    return (local.year, (local.month - 1) // 3 + 1)


# borg's period rules, in the order borg applies them.
_PERIODS: tuple[tuple[str, Callable[[datetime], object]], ...] = (
    ("secondly", lambda t: t.strftime("%Y-%m-%d %H:%M:%S")),
    ("minutely", lambda t: t.strftime("%Y-%m-%d %H:%M")),
    ("hourly", lambda t: t.strftime("%Y-%m-%d %H")),
    ("daily", lambda t: t.strftime("%Y-%m-%d")),
    ("weekly", lambda t: t.strftime("%G-%V")),
    ("monthly", lambda t: t.strftime("%Y-%m")),
    ("quarterly_13weekly", _quarter_13weekly),
    ("quarterly_3monthly", _quarter_3monthly),
    ("yearly", lambda t: t.strftime("%Y")),
)


@frozen(kw_only=True)
class KeepRules(RetentionPolicy):
    """``borg prune``'s rules, with borg's own semantics.

    The rules are applied together, as ``borg prune`` applies its options:
    ``within`` first, then the period rules from ``secondly`` to ``yearly``;
    an archive kept by an earlier rule uses up its period for later rules
    without counting for them; a rule that is not filled keeps the oldest
    archive. Periods are in local time as borg computes it (the process's
    time zone, or ``tz``).

    Args:
        within: Keep everything younger than this (``--keep-within``).
        last: Keep the last N archives (``--keep-last``, the same as ``secondly``).
        secondly, minutely, hourly, daily, weekly, monthly: ``--keep-<rule> N``.
        quarterly_13weekly: ``--keep-13weekly N``.
        quarterly_3monthly: ``--keep-3monthly N``.
        yearly: ``--keep-yearly N``.
        tz: The time zone periods are counted in; ``None``: the process's local
            time, exactly as borg computes it.

    Raises:
        ConfigurationError: No rule, a negative count, both ``last`` and
            ``secondly``, or both quarterly rules (borg refuses these too).
    """

    within: timedelta | None = field(default=None, converter=_within)
    last: int | None = field(default=None, converter=_count)
    secondly: int | None = field(default=None, converter=_count)
    minutely: int | None = field(default=None, converter=_count)
    hourly: int | None = field(default=None, converter=_count)
    daily: int | None = field(default=None, converter=_count)
    weekly: int | None = field(default=None, converter=_count)
    monthly: int | None = field(default=None, converter=_count)
    quarterly_13weekly: int | None = field(default=None, converter=_count)
    quarterly_3monthly: int | None = field(default=None, converter=_count)
    yearly: int | None = field(default=None, converter=_count)
    tz: tzinfo | None = None

    def __attrs_post_init__(self) -> None:
        if self.last is not None and self.secondly is not None:
            raise ConfigurationError("last and secondly are the same rule in borg: give one")
        if self.quarterly_13weekly and self.quarterly_3monthly:
            raise ConfigurationError("borg allows one quarterly rule: quarterly_13weekly or quarterly_3monthly")
        if self.within is None and not any(self._count(name) for name, _ in _PERIODS):
            # As borg prune: rules with a count of 0 do not count as rules.
            raise ConfigurationError("give at least one rule (within, or last, secondly … yearly above 0)")

    def _count(self, name: str) -> int | None:
        if name == "secondly" and self.last is not None:
            return self.last
        value: int | None = getattr(self, name)
        return value

    def decide(self, archives: Sequence[ArchiveInfo], now: datetime) -> Sequence[Decision]:
        # borg sorts by time (newest first); ties keep the given order.
        order = sorted(range(len(archives)), key=lambda i: archives[i].time, reverse=True)
        reasons: dict[int, str] = {}
        if self.within is not None:
            cutoff = now - self.within
            kept = 0
            for i in order:
                if archives[i].time > cutoff:
                    kept += 1
                    reasons[i] = f"within {self.within} #{kept}"
        local = _local_time(self.tz)
        for name, period_of in _PERIODS:
            wanted = self._count(name)
            if not wanted:
                continue
            label = "last" if name == "secondly" and self.last is not None else name
            kept = 0
            last_period: object = None
            seen: int | None = None
            for seen in order:
                period = period_of(local(archives[seen].time))
                if period != last_period:
                    last_period = period
                    if seen not in reasons:
                        kept += 1
                        reasons[seen] = f"{label} #{kept}"
                        if kept == wanted:
                            break
            # As borg: a rule that is not filled also keeps the oldest archive.
            if seen is not None and kept < wanted and seen not in reasons:
                kept += 1
                reasons[seen] = f"{label}[oldest] #{kept}"
        return [Decision(True, reasons[i]) if i in reasons else PRUNE for i in range(len(archives))]


@frozen
class KeepLabels(RetentionPolicy):
    """Keep every archive that carries one of these labels.

    Args:
        labels: The labels to keep.
    """

    labels: frozenset[str] = field(converter=frozenset)

    def decide(self, archives: Sequence[ArchiveInfo], now: datetime) -> Sequence[Decision]:
        out = []
        for archive in archives:
            found = sorted(self.labels & archive.metadata.labels)
            out.append(Decision(True, f"label {found[0]}") if found else PRUNE)
        return out
