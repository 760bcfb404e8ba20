"""The restore journal: which blocks of which files an interrupted restore already made durable.

One small JSON file in the target folder, :data:`JOURNAL_NAME`, replaced
atomically (written to a temporary file, fsynced, renamed over the old one, the
folder fsynced), so a crash leaves either the old or the new journal, never a
torn one. A block is recorded only after the data written for it was fsynced.
It is removed after a successful restore.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from attrs import field, frozen

__all__ = ["JOURNAL_NAME", "JOURNAL_VERSION", "RestoreFileState", "RestoreState", "coalesce", "intervals_cover"]

JOURNAL_NAME = ".vbremote-restore.json"
"""The journal's file name in the target folder."""

JOURNAL_VERSION = 1

Interval = tuple[int, int]


def coalesce(intervals: Iterable[Interval]) -> tuple[Interval, ...]:
    """Sorted, merged ``(start, end)`` intervals (end exclusive); touching ones are joined."""
    out: list[list[int]] = []
    for start, end in sorted(intervals):
        if end <= start:
            continue
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return tuple((a, b) for a, b in out)


def intervals_cover(intervals: tuple[Interval, ...], offset: int, size: int) -> bool:
    """Whether the coalesced ``intervals`` contain all of ``[offset, offset + size)``."""
    lo, hi = 0, len(intervals)
    while lo < hi:  # the last interval starting at or before offset
        mid = (lo + hi) // 2
        if intervals[mid][0] <= offset:
            lo = mid + 1
        else:
            hi = mid
    return lo > 0 and intervals[lo - 1][1] >= offset + size


def subtract(intervals: tuple[Interval, ...], start: int, end: int) -> tuple[Interval, ...]:
    """The intervals without ``[start, end)``."""
    out: list[Interval] = []
    for a, b in intervals:
        if b <= start or a >= end:
            out.append((a, b))
            continue
        if a < start:
            out.append((a, start))
        if b > end:
            out.append((end, b))
    return tuple(out)


def _files(value: Iterable[RestoreFileState]) -> tuple[RestoreFileState, ...]:
    return tuple(value)


def _intervals(value: Iterable[Interval]) -> tuple[Interval, ...]:
    return coalesce((int(a), int(b)) for a, b in value)


@frozen
class RestoreFileState:
    """What the journal records of one target file.

    Attributes:
        path: The file, relative to the target folder.
        size: Its final size in the archive.
        done: Byte ranges ``(start, end)`` (end exclusive, sorted, merged) that
            were written and made durable.
    """

    path: str
    size: int
    done: tuple[Interval, ...] = field(converter=_intervals, default=())

    @property
    def done_bytes(self) -> int:
        """Bytes recorded as done."""
        return sum(b - a for a, b in self.done)


@frozen
class RestoreState:
    """The content of a restore journal: the progress of one restore of one archive into one folder.

    Attributes:
        archive_id: The archive's id (hex).
        archive: The archive's name (for people).
        fingerprint: A hash of the archive id and every file's chunk list; a
            journal whose fingerprint differs from the plan's is not trusted.
        files: Each target file with its done ranges.
        version: The journal format version.
    """

    archive_id: str
    archive: str
    fingerprint: str
    files: tuple[RestoreFileState, ...] = field(converter=_files)
    version: int = JOURNAL_VERSION

    @property
    def done_bytes(self) -> int:
        """Bytes recorded as done, over all files."""
        return sum(f.done_bytes for f in self.files)

    def file(self, path: str) -> RestoreFileState | None:
        """The state of the file at ``path``, if the journal has it."""
        for f in self.files:
            if f.path == path:
                return f
        return None

    def to_json(self) -> dict[str, Any]:
        """The journal as JSON-serialisable data."""
        return {
            "version": self.version,
            "archive_id": self.archive_id,
            "archive": self.archive,
            "fingerprint": self.fingerprint,
            "files": [{"path": f.path, "size": f.size, "done": [list(r) for r in f.done]} for f in self.files],
        }

    @classmethod
    def from_json(cls, data: Any) -> RestoreState:
        """Parse the journal; raises ValueError (or KeyError/TypeError) when it is malformed."""
        if not isinstance(data, dict) or data.get("version") != JOURNAL_VERSION:
            raise ValueError("not a journal of a known version")
        files = []
        for f in data["files"]:
            done = [(int(a), int(b)) for a, b in f["done"]]
            if any(a < 0 or b < a for a, b in done):
                raise ValueError("a negative range")
            files.append(RestoreFileState(path=str(f["path"]), size=int(f["size"]), done=done))
        return cls(
            archive_id=str(data["archive_id"]), archive=str(data["archive"]),
            fingerprint=str(data["fingerprint"]), files=files,
        )

    @classmethod
    def load(cls, target: str | os.PathLike[str]) -> RestoreState | None:
        """The journal in the ``target`` folder, or None when there is none or it cannot be read.

        A journal that does not parse is ignored (as if absent): the restore
        then starts from the comparison, which is always safe.
        """
        try:
            raw = Path(target, JOURNAL_NAME).read_bytes()
            return cls.from_json(json.loads(raw))
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            return None

    def save(self, target: str | os.PathLike[str]) -> None:
        """Replace the journal in ``target`` atomically and durably.

        Raises:
            OSError: The write failed (the old journal is left as it was).
        """
        replace_durably(Path(target) / JOURNAL_NAME, json.dumps(self.to_json(), separators=(",", ":")).encode())


def remove_journal(target: str | os.PathLike[str]) -> None:
    """Remove the journal (after a successful restore); durable."""
    folder = Path(target)
    for name in (JOURNAL_NAME, JOURNAL_NAME + ".tmp"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / name)
    fsync_dir(folder)


def replace_durably(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data``: the file is the old one or the new one, whole, and durable.

    Written to a temporary file beside it (a fixed name, hidden: a write
    killed half-way leaves one file, replaced by the next), fsynced, renamed
    over ``path``, then the folder fsynced. Never follows a symlink at the
    temporary name.

    Raises:
        OSError: The write failed (``path`` is left as it was, the temporary file removed).
    """
    temp = path.with_name((path.name if path.name.startswith(".") else "." + path.name) + ".tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """fsync a folder, so that renames and new names in it are durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
