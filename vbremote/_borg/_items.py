"""An archive's items as the worker reads them, validated before anyone uses them.

An archive comes from a server that may be compromised, and archives made by
other tools (the borg CLI) are read too. So every path, mode and size is
checked here, in vbremote's own process, before it becomes a value: a path
must stay inside the folder it will be restored into, sizes must add up, and
no path may appear twice.
"""

from __future__ import annotations

import posixpath
import stat
from collections.abc import Callable, Sequence
from typing import Any

from .._errors import ArchiveInvalid
from .._models import ArchiveContents, ChunkRef, FileChunks, ItemKind, StoredItem

__all__ = ["MAX_CHUNK_SIZE", "contents_from_rows"]

#: The largest chunk accepted. borg cuts at most 8 MiB with its default
#: chunker, and stores no object above about 20 MiB; a larger plaintext size
#: is a lie that would make a reader allocate it.
MAX_CHUNK_SIZE = 64 << 20

_ID_SIZE = 32

_Refuse = Callable[..., ArchiveInvalid]

_KINDS = {
    stat.S_IFREG: ItemKind.FILE,
    stat.S_IFDIR: ItemKind.DIRECTORY,
    stat.S_IFLNK: ItemKind.SYMLINK,
    stat.S_IFBLK: ItemKind.BLOCK_DEVICE,
    stat.S_IFCHR: ItemKind.CHAR_DEVICE,
    stat.S_IFIFO: ItemKind.FIFO,
}


def contents_from_rows(archive: str, rows: Sequence[Any], *, location: str) -> ArchiveContents:
    """Validated :class:`ArchiveContents` from the worker's raw rows.

    Each row is ``(path, mode, size or None, [(id, size)] or None, source or
    None, hardlink_master)``, as borg stores the item.

    Raises:
        ArchiveInvalid: A path that is absolute, not normalised or leaves the
            folder; a duplicate path; an unknown item type; a chunk id or size
            that is malformed; a stored size that differs from its chunks'.
    """
    seen: set[str] = set()
    items: list[StoredItem] = []

    def refuse(message: str, path: str = "") -> ArchiveInvalid:
        where = f" at {path!r}" if path else ""
        return ArchiveInvalid(
            f"archive {archive!r}{where}: {message}", location=location, archive=archive, path=path
        )

    for row in rows:
        try:
            path, mode, size, chunks, source, master = row
        except (TypeError, ValueError):
            raise refuse("an item record of the wrong shape") from None
        if not isinstance(path, str):
            raise refuse("an item path that is not text")
        if path == "." and isinstance(mode, int) and stat.S_ISDIR(mode):
            # `borg create ... .` run inside a folder stores the folder itself as
            # ".": the archive's root, not a path that leaves it.
            pass
        else:
            _check_path(path, refuse)
        if path in seen:
            raise refuse("the path appears twice", path)
        seen.add(path)
        if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode < 1 << 32:
            raise refuse(f"an invalid mode {mode!r}", path)
        kind = _KINDS.get(stat.S_IFMT(mode))
        if kind is None:
            raise refuse(f"an unknown item type (mode {mode:o})", path)
        link_target = None
        if source is not None:
            if not isinstance(source, str):
                raise refuse("a link target that is not text", path)
            link_target = source
        file_chunks = None
        if kind is ItemKind.FILE and link_target is None:
            file_chunks = _chunk_list(archive, path, size, chunks or [], refuse)
        elif chunks:
            raise refuse(f"a {'hard link' if kind is ItemKind.FILE else kind.value} with content", path)
        elif kind is ItemKind.FILE:
            # One of borg's other names of a hard link: the content is at link_target.
            _check_path(link_target, refuse)
        items.append(
            StoredItem(
                path=path, kind=kind, mode=mode, chunks=file_chunks, link_target=link_target,
                hardlinked=kind is ItemKind.FILE and (bool(master) or (link_target is not None)),
            )
        )
    return ArchiveContents(archive=archive, items=tuple(items))


def _check_path(path: Any, refuse: _Refuse) -> None:
    if not path or path.startswith("/") or "\0" in path:
        raise refuse("an absolute or empty path", path)
    normal = posixpath.normpath(path)
    if normal != path or normal == "." or ".." in normal.split("/"):
        raise refuse("a path that is not normalised or leaves the folder", path)


def _chunk_list(archive: str, path: str, size: Any, chunks: Any, refuse: _Refuse) -> FileChunks:
    if not isinstance(chunks, list):
        raise refuse("a chunk list of the wrong shape", path)
    refs = []
    offset = 0
    for entry in chunks:
        try:
            chunk_id, chunk_size = entry
        except (TypeError, ValueError):
            raise refuse("a chunk entry of the wrong shape", path) from None
        if not isinstance(chunk_id, bytes) or len(chunk_id) != _ID_SIZE:
            raise refuse("a malformed chunk id", path)
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise refuse(f"a chunk size of {chunk_size!r} bytes", path)
        refs.append(ChunkRef(id=chunk_id, offset=offset, size=chunk_size))
        offset += chunk_size
    if size is not None and size != offset:
        raise refuse(f"a stored size of {size!r} bytes, but its chunks hold {offset}", path)
    return FileChunks(archive=archive, path=path, size=offset, chunks=tuple(refs))
