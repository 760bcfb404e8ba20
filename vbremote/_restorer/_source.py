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

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from attrs import field, frozen

from .._errors import ArchiveInvalid, ConfigurationError
from .._models import EXTERNAL_FOLDER, ArchiveInfo, ChunkRef, FileRole, SnapshotMode, _check_archive_path
from .._settings import MachineSettings
from ._checks import check_settings
from ._rewrite import rewrite_paths as _rewrite_paths

if TYPE_CHECKING:
    from .._repository import Repository

__all__ = ["RestoreSource", "SourceFile", "referenced_files", "source_from_archive"]


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


def referenced_files(settings: MachineSettings) -> Iterator[tuple[str, FileRole, str]]:
    """Every file the settings name that a restore writes: (path as written, role, what it is).

    Hard disks of the media registry (differencing images included), the
    saved-state files of the machine and of every snapshot, and the NVRAM
    files of the machine and of every snapshot. DVD and floppy images are
    only referenced, never written, and are not listed.
    """
    for medium in settings.all_media():
        yield medium.location, FileRole.DISK, f"medium location of {{{medium.uuid}}}"
    if settings.state_file:
        yield settings.state_file, FileRole.STATE, "machine's state file"
    if settings.nvram:
        yield settings.nvram, FileRole.NVRAM, "machine's NVRAM file"
    for node in settings.snapshots():
        if node.state_file:
            yield node.state_file, FileRole.STATE, f"state file of snapshot {node.name!r}"
        if node.nvram:
            yield node.nvram, FileRole.NVRAM, f"NVRAM file of snapshot {node.name!r}"


def _fetch_whole(repository: Repository, chunks: tuple[ChunkRef, ...]) -> bytes:
    wanted = [chunk.id for chunk in chunks]
    got: dict[bytes, bytes] = {}
    with repository.fetch(wanted) as stream:
        for chunk in stream:
            got[chunk.id] = chunk.data
    return b"".join(got[chunk.id] for chunk in chunks)


def source_from_archive(
    repository: Repository,
    archive: ArchiveInfo | str,
    *,
    external: Mapping[str, str] | None = None,
) -> RestoreSource:
    """What a vbremote archive restores: its settings file, checked, and its data files.

    The settings file is read from the archive (its chunks fetched) and
    parsed as untrusted input. Every file it names that a restore writes
    (hard disks, saved states, NVRAM files, of the machine and of every
    snapshot) and its snapshot folder must be relative paths inside the VM
    folder, and every disk and saved state must be in the archive; otherwise
    the archive is refused before anything is written.

    Args:
        repository: The open repository.
        archive: The archive, or its name.
        external: Where files the archive keeps under ``_external/`` go,
            relative to the target folder (default: where they are in the
            archive, inside the target folder). The settings are rewritten to match.

    Returns:
        The source, its files in the archive's order; the settings file is
        not among them (it is written when the data is in place).

    Raises:
        ArchiveNotFound: No such vbremote archive.
        ArchiveMetadataError: Its metadata is malformed or hostile.
        ArchiveInvalid: Its items disagree with its metadata, its settings
            file is missing, unreadable or names files outside the VM
            folder, or a file the settings need is not in it. The error names
            the archive and the path at fault.
    """
    info = archive if isinstance(archive, ArchiveInfo) else repository.archive(archive)
    location = repository.transport.location

    def refuse(message: str, path: str = "") -> ArchiveInvalid:
        return ArchiveInvalid(f"archive {info.name!r}: {message}", location=location, archive=info.name,
                              path=path)

    contents = repository.chunk_lists(info)
    stored = contents.files()
    settings_files = [f for f in info.files if f.role is FileRole.SETTINGS]
    if len(settings_files) != 1:
        raise refuse(f"{len(settings_files)} settings files in the metadata, not one")
    (settings_file,) = settings_files
    if "/" in settings_file.path:
        raise refuse(f"the settings file {settings_file.path!r} is not at the archive's top", settings_file.path)
    for recorded in info.files:
        item = stored.get(recorded.path)
        if item is None:
            raise refuse(f"{recorded.path!r} is in the metadata but not in the archive", recorded.path)
        if item.size != recorded.size:
            raise refuse(f"{recorded.path!r} is {item.size} bytes, the metadata says {recorded.size}", recorded.path)
    data = _fetch_whole(repository, stored[settings_file.path].chunks)
    settings, references = check_settings(data, archive=info.name, location=location)
    wanted = {reference.path: (reference.role, reference.what) for reference in references}
    if settings.uuid != info.vm_uuid:
        raise refuse(f"the settings file is of VM {{{settings.uuid}}}, the metadata says {{{info.vm_uuid}}}",
                     settings_file.path)
    recorded_paths = {f.path: f for f in info.files}
    for path, (role, what) in wanted.items():
        if path not in recorded_paths and role is not FileRole.NVRAM:
            # VirtualBox creates a missing NVRAM store at the next start; a disk or state file it cannot make.
            raise refuse(f"the settings need {path!r} ({what}), which is not in the archive", path)
    mapping = dict(external or {})
    for source_path, target in mapping.items():
        if source_path not in recorded_paths or source_path.split("/")[0] != EXTERNAL_FOLDER:
            raise ConfigurationError(f"archive {info.name!r}: no {EXTERNAL_FOLDER}/ file {source_path!r} to map")
        mapping[source_path] = _check_archive_path(target)
    settings_data = _rewrite_paths(data, mapping) if mapping else data
    files: list[SourceFile] = []
    try:
        for recorded in info.files:
            if recorded is settings_file:
                continue
            item = stored[recorded.path]
            files.append(SourceFile(archive_path=recorded.path, target_path=mapping.get(recorded.path, recorded.path),
                                    role=recorded.role, size=item.size, chunks=item.chunks))
        return RestoreSource(
            archive=info.name, archive_id=info.id, vm_uuid=info.vm_uuid, vm_name=settings.name, mode=info.mode,
            settings_path=settings_file.path, settings=settings_data, files=tuple(files),
            vbox_version=info.metadata.vbox_version, cpu_vendor=info.metadata.cpu_vendor,
            cpu_portability=info.metadata.cpu_portability,
        )
    except ConfigurationError as exc:
        raise refuse(str(exc)) from exc
