"""The stale-file list of an in-place restore, persisted so that a crash cannot orphan the old VM's files.

An in-place restore replaces the old VM's settings; once they are gone nothing
names the files only they referenced (a later snapshot's differencing
images, a saved state). So the list of those files is made before anything
changes and kept in the target folder, in :func:`stale_name` (one per VM
uuid), replaced atomically like the journal (written, fsynced, renamed, the
folder fsynced). A re-run of the restore into the same folder adds what the
list still names to its own, removes the files once the VM is restored, and
only then deletes the list.

Removal is careful, whatever the list says: only regular files inside the
target folder, reached through real folders (every component is checked
with ``lstat``, so a folder that became a symlink is not followed), and
never a file the restored settings reference.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import stat
import uuid
from collections.abc import Iterable, Set
from pathlib import Path, PurePosixPath

from ._journal import JOURNAL_NAME, fsync_dir, replace_durably

__all__ = [
    "STALE_PREFIX", "forget_stale", "is_regular_inside", "load_stale", "remove_stale", "save_stale", "stale_name",
    "vm_key",
]

log = logging.getLogger("vbremote.restore")

STALE_PREFIX = ".vbremote-stale-"
"""The stale lists' file names in the target folder start with this; the VM uuid and ``.json`` follow."""

_VERSION = 1


def vm_key(vm_uuid: str) -> str:
    """``vm_uuid`` as a file name: the canonical uuid (as VirtualBox writes it), or a hash of what is not one.

    An archive of another tool carries whatever its settings file says; it
    must not choose a path.
    """
    try:
        return str(uuid.UUID(vm_uuid.strip()))
    except ValueError:
        return "vm-" + hashlib.sha256(vm_uuid.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def stale_name(vm_uuid: str) -> str:
    """The stale list's file name for the VM ``vm_uuid``."""
    return f"{STALE_PREFIX}{vm_key(vm_uuid)}.json"


def _relative(folder: Path, path: Path) -> str | None:
    """``path`` relative to ``folder`` as a clean POSIX path, or None when it is not strictly inside."""
    try:
        rel = PurePosixPath(os.path.normpath(path).replace(os.sep, "/")).relative_to(
            PurePosixPath(os.path.normpath(folder)))
    except ValueError:
        return None
    parts = rel.parts
    if not parts or any(p in ("", ".", "..") for p in parts):
        return None
    return rel.as_posix()


def load_stale(folder: Path, vm_uuid: str) -> set[Path]:
    """The files the list of an earlier, interrupted restore of ``vm_uuid`` into ``folder`` still names.

    A list that cannot be read or parsed is ignored (nothing is removed on its
    word); entries that are not clean relative paths are dropped.
    """
    try:
        data = json.loads((folder / stale_name(vm_uuid)).read_bytes())
        if not isinstance(data, dict) or data.get("version") != _VERSION or data.get("vm_uuid") != vm_uuid:
            return set()
        entries = data["files"]
        if not isinstance(entries, list):
            return set()
    except (OSError, ValueError, KeyError, RecursionError):
        return set()
    out: set[Path] = set()
    for entry in entries:
        if not isinstance(entry, str) or entry.startswith("/") or "\\" in entry or "\0" in entry:
            continue
        path = folder / entry
        if _relative(folder, path) == entry:
            out.add(path)
    return out


def save_stale(folder: Path, vm_uuid: str, files: Iterable[Path]) -> None:
    """Replace the stale list of ``vm_uuid`` in ``folder`` atomically and durably (only paths inside ``folder``).

    Raises:
        OSError: The write failed (the old list is left as it was).
    """
    entries = sorted({rel for p in files if (rel := _relative(folder, p)) is not None})
    data = json.dumps({"version": _VERSION, "vm_uuid": vm_uuid, "files": entries}, separators=(",", ":")).encode()
    replace_durably(folder / stale_name(vm_uuid), data)


def forget_stale(folder: Path, vm_uuid: str) -> None:
    """Delete the stale list of ``vm_uuid`` (its files were removed); durable."""
    name = stale_name(vm_uuid)
    gone = False
    for each in (name, name + ".tmp"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / each)
            gone = True
    if gone:
        fsync_dir(folder)


def _walk(folder: Path, path: Path, *, unlink: bool) -> bool:
    """Whether ``path`` is a regular file strictly inside ``folder`` reached through real folders; unlink it if asked.

    The walk opens each folder below ``folder`` relative to the previous one
    with ``O_NOFOLLOW`` and looks at the file with ``lstat`` there, so a
    symlink anywhere (the file, or a folder on the way, even one swapped in
    meanwhile) answers False and nothing outside is touched.
    """
    rel = _relative(folder, path)
    if rel is None:
        return False
    *folders, name = rel.split("/")
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        for part in folders:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = inner
        if not stat.S_ISREG(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
            return False
        if unlink:
            os.unlink(name, dir_fd=fd)
            os.fsync(fd)
    except OSError as exc:
        if unlink and exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            log.warning("stale file %s could not be removed: %s", path, exc)
        return False
    finally:
        os.close(fd)
    return True


def is_regular_inside(folder: Path, path: Path) -> bool:
    """Whether ``path`` is a regular file strictly inside ``folder``, reached through real folders only."""
    return _walk(folder, path, unlink=False)


def remove_stale(folder: Path, stale: Iterable[Path], keep: Set[Path]) -> tuple[Path, ...]:
    """Remove the regular files of ``stale`` inside ``folder`` that ``keep`` does not name; returns those removed.

    The restore's own files (the journal, the stale lists) are never removed.
    A file that cannot be removed is logged and left.
    """
    kept = {Path(os.path.normpath(p)) for p in keep}
    return tuple(
        path for path in sorted({Path(os.path.normpath(p)) for p in stale})
        if path not in kept and not path.name.startswith((STALE_PREFIX, JOURNAL_NAME))
        and _walk(folder, path, unlink=True)
    )
