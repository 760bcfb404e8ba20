"""What an archive restores: its files, where each goes, and the settings to register.

A :class:`RestoreSource` is built from an archive, a vbremote one (from its
metadata) or one another tool made (from its items and the ``.vbox`` file in
it), and is all that the planning and apply steps see: they write
:attr:`RestoreSource.files` into a target folder and never look at the
archive's own paths again. Everything in it is validated when it is built: an
archive is input from a server that may be compromised, and nothing may be
written outside the target folder.
"""

from __future__ import annotations

from collections.abc import Iterable

from attrs import field, frozen

from .._errors import ConfigurationError
from .._models import ChunkRef, FileRole, SnapshotMode, _check_archive_path

__all__ = ["RestoreSource", "SourceFile"]


def _target_path(value: str) -> str:
    # The same rules as an archive path: relative, POSIX-style, normalised, no ".." parts.
    return _check_archive_path(value)


def _chunks(value: tuple[ChunkRef, ...]) -> tuple[ChunkRef, ...]:
    return tuple(value)


def _files(value: Iterable[SourceFile]) -> tuple[SourceFile, ...]:
    return tuple(value)


def _notes(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@frozen
class SourceFile:
    """One file that a restore writes into the target folder.

    Attributes:
        archive_path: The item's path in the archive (for messages).
        target_path: Where it goes, relative to the target folder (relative,
            normalised, never leaving the folder).
        role: What the file is to the VM (disk, saved state, NVRAM, other).
        size: Its final size in bytes.
        chunks: The archive's own chunk boundaries, in file order: each chunk's
            id, offset and size. Planning compares the local file at exactly
            these boundaries, whatever chunker made them.
    """

    archive_path: str
    target_path: str = field(converter=_target_path)
    role: FileRole
    size: int
    chunks: tuple[ChunkRef, ...] = field(converter=_chunks)

    def __attrs_post_init__(self) -> None:
        offset = 0
        for chunk in self.chunks:
            if chunk.offset != offset or chunk.size <= 0:
                raise ConfigurationError(
                    f"{self.archive_path}: chunk at offset {chunk.offset} does not follow the one before"
                )
            offset += chunk.size
        if offset != self.size:
            raise ConfigurationError(f"{self.archive_path}: chunks add up to {offset} bytes, not {self.size}")


@frozen
class RestoreSource:
    """Everything a restore needs from one archive.

    Attributes:
        archive: The archive name.
        archive_id: The archive id (hex); the journal is keyed by it.
        vm_uuid: The VM's uuid, as the settings file says.
        vm_name: The VM's name, as the settings file says.
        mode: How the snapshot was taken; an online or migrate archive
            restores a ``Saved`` VM.
        settings_path: Where the settings file goes, relative to the target folder.
        settings: The settings file to register, frozen at the snapshot's
            instant, its paths relative to the target folder.
        files: The data files (disks, saved states, NVRAM), never the settings file.
        vbox_version: The VirtualBox version that took the snapshot, where known.
        cpu_vendor: The host CPU vendor, where known.
        cpu_portability: The VM's CPU portability level, where known.
        foreign: Whether another tool made the archive (no vbremote metadata).
        notes: What building the source decided that a caller should be told
            (e.g. for another tool's archive: which snapshot the settings were
            frozen at, or that there was none).
    """

    archive: str
    archive_id: str
    vm_uuid: str
    vm_name: str
    mode: SnapshotMode
    settings_path: str = field(converter=_target_path)
    settings: bytes
    files: tuple[SourceFile, ...] = field(converter=_files)
    vbox_version: str | None = None
    cpu_vendor: str | None = None
    cpu_portability: int | None = None
    foreign: bool = False
    notes: tuple[str, ...] = field(default=(), converter=_notes)

    def __attrs_post_init__(self) -> None:
        seen = {self.settings_path}
        for item in self.files:
            if item.target_path in seen:
                raise ConfigurationError(f"archive {self.archive!r}: two files for {item.target_path!r}")
            seen.add(item.target_path)
        # No file may sit inside another file's path (a file named like a folder of another).
        prefixes = {path + "/" for path in seen}
        for path in seen:
            if any(path.startswith(prefix) for prefix in prefixes):
                raise ConfigurationError(f"archive {self.archive!r}: {path!r} lies inside another file's path")
