"""Which files make up the frozen instant, and where each goes in the archive.

The input is the frozen settings (:func:`vbremote._settings.freeze_instant`
already removed the transient snapshot and its in-flight differencing images).
Everything those settings refer to is collected, so that the VM comes back
whole from the archive alone:

- every hard disk of the media registry: the chains the frozen current state
  attaches and the media of every user snapshot (the in-flight images are no
  longer in it, so they are never archived);
- the machine's saved-state file (the instant's, for an online snapshot) and
  every user snapshot's;
- the NVRAM files: the machine's and every user snapshot's copy.

Logs are never collected. Paths inside the VM folder keep their place;
files outside it go under ``_external/`` and the returned mapping says where
each came from (:func:`vbremote._settings.relocate` takes it as is).

DVD and floppy images (``MediaRegistry/DVDImages`` and ``FloppyImages``,
written by ``ConfigFileBase::buildMediaRegistry``, src/VBox/Main/xml/
Settings.cpp, 7.1 tree) are not collected: VirtualBox only reads them, they
are often large and shared between VMs, and a snapshot would read them again
on every run. The archive refers to them where they are:
:func:`anchor_images` gives each its absolute path on this host, so that a
VM brought back into another folder still finds them (VirtualBox writes the
path of an image in the VM folder relative to it).
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterator, Mapping
from pathlib import Path

from attrs import frozen

from .._errors import SnapshotError
from .._models import EXTERNAL_FOLDER, STATE_COMPRESSION, FileRole, FileSpec
from .._settings import _N, MachineSettings, Medium, _dump, _load, _machine

__all__ = ["Collected", "MediumRecord", "anchor_images", "collect"]

log = logging.getLogger("vbremote.snapshot")


@frozen
class MediumRecord:
    """A disk image in the archive: its medium uuid and its parent's (``None`` for a base)."""

    uuid: str
    parent: str | None


@frozen
class Collected:
    """The files of a frozen instant (the settings file aside).

    Attributes:
        files: What to store, with archive paths and roles, in a stable order
            (disks by registry order, then saved states, then NVRAM).
        external: Outside paths as the settings write them, mapped to their
            archive paths (``_external/...``).
        media: Per disk's archive path, its medium uuid and parent.
    """

    files: tuple[FileSpec, ...]
    external: Mapping[str, str]
    media: Mapping[str, MediumRecord]


def _state_files(settings: MachineSettings) -> Iterator[str]:
    if settings.state_file:
        yield settings.state_file
    for node in settings.snapshots():
        if node.state_file:
            yield node.state_file


def _nvram_files(settings: MachineSettings) -> Iterator[str]:
    if settings.nvram:
        yield settings.nvram
    for node in settings.snapshots():
        if node.nvram:
            yield node.nvram


def collect(settings: MachineSettings, folder: Path, *, vm: str = "") -> Collected:
    """The files of the frozen instant described by ``settings``, whose VM folder is ``folder``.

    Args:
        settings: The frozen settings, parsed.
        folder: The VM folder (absolute): relative paths in the settings are relative to it.
        vm: The VM, for errors.

    Returns:
        The files, the mapping of outside paths and the disks' medium records.

    Raises:
        SnapshotError: A disk or saved-state file the settings name does not exist.
    """
    files: list[FileSpec] = []
    external: dict[str, str] = {}
    media: dict[str, MediumRecord] = {}
    seen: dict[Path, str] = {}
    taken: set[str] = set()

    def place(written: str, role: FileRole, *, required: bool, medium: MediumRecord | None = None) -> str | None:
        source = Path(posixpath.normpath(posixpath.join(str(folder), written)))
        if source in seen:
            return seen[source]
        if not source.is_file():
            if required:
                raise SnapshotError(
                    f"{vm}: the settings name {written!r} ({role.value}) but {source} is not a file", vm=vm
                )
            log.warning("%s: %s file %s does not exist; not archived", vm, role.value, source)
            return None
        try:
            path = source.relative_to(folder).as_posix()
        except ValueError:
            path = _external_path(source, taken)
            external[written] = path
        if path.split("/")[0] == EXTERNAL_FOLDER and written not in external:
            # A file that really lives in a folder named like the reserved one.
            raise SnapshotError(f"{vm}: {source} lies in the VM folder's reserved {EXTERNAL_FOLDER}/", vm=vm)
        taken.add(path)
        seen[source] = path
        files.append(FileSpec(source, path, role, medium=medium.uuid if medium else None,
                              parent=medium.parent if medium else None,
                              compression=STATE_COMPRESSION if role is FileRole.STATE else None))
        return path

    for medium, parent in _registry(settings):
        record = MediumRecord(uuid=medium.uuid, parent=parent)
        path = place(medium.location, FileRole.DISK, required=True, medium=record)
        assert path is not None
        media[path] = record
    for state_file in _state_files(settings):
        place(state_file, FileRole.STATE, required=True)
    for nvram in _nvram_files(settings):
        # VirtualBox creates the NVRAM store at the first start: it may not exist yet.
        place(nvram, FileRole.NVRAM, required=False)
    return Collected(files=tuple(files), external=external, media=media)


def _registry(settings: MachineSettings) -> Iterator[tuple[Medium, str | None]]:
    stack: list[tuple[Medium, str | None]] = [(medium, None) for medium in reversed(settings.media)]
    while stack:
        medium, parent = stack.pop()
        yield medium, parent
        stack.extend((child, medium.uuid) for child in reversed(medium.children))


def _external_path(source: Path, taken: set[str]) -> str:
    """``_external/<file name>``; a second outside file of the same name gets a numbered folder."""
    path = f"{EXTERNAL_FOLDER}/{source.name}"
    number = 2
    while path in taken:
        path = f"{EXTERNAL_FOLDER}/{number}/{source.name}"
        number += 1
    return path


def anchor_images(data: bytes, folder: Path) -> tuple[bytes, tuple[str, ...]]:
    """Give every DVD and floppy image of a settings file's media registry its absolute path.

    Args:
        data: The settings file (frozen and relocated).
        folder: The VM folder (absolute) that relative image paths are relative to.

    Returns:
        The rewritten settings file and the images' absolute paths, in registry order.

    Raises:
        SettingsFileError: Not a readable settings file.
    """
    prolog, root = _load(data)
    images: list[str] = []
    registry = _machine(root).find(_N + "MediaRegistry")
    if registry is None:
        return data, ()
    for kind in ("DVDImages", "FloppyImages"):
        holder = registry.find(_N + kind)
        for image in holder.iter(_N + "Image") if holder is not None else ():
            location = image.get("location", "")
            if not location:
                continue
            absolute = posixpath.normpath(posixpath.join(str(folder), location))
            image.set("location", absolute)
            images.append(absolute)
    if not images:
        return data, ()
    return _dump(prolog, root), tuple(images)
