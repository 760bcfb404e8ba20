"""Archives that another tool made with the borg CLI from a VM folder.

The model is the PowerShell project ``PythonNut/virtualbox-remote-snapshots``
(``virtualbox-remote-snapshots.ps1``, last commit 7d3bdd1):

- It finds the VM folder as the folder of the machine's settings file
  (``VBoxManage showvminfo --machinereadable``, ``CfgFile=``; lines 95-101).
- A snapshot (``Snapshot-Create``, lines 113-150) takes a VirtualBox snapshot
  named ``vrs-temp`` (``--live`` when the VM runs, lines 115-123), then runs
  borg under Cygwin's bash on the Windows host: ``cd`` into the VM folder
  (``/cygdrive/<drive>/<folder>``, lines 105-107 and 137) and
  ``borg create -vspx -C lz4 HOST:PATH::'<VM name, spaces as dashes>-<%Y.%m.%d-%H.%M.%S>-<online|offline>' .``
  (line 138), and deletes ``vrs-temp`` afterwards (line 148). So the items are
  paths relative to the VM folder: ``.`` (the folder itself), ``<name>.vbox``,
  ``<name>.vbox-prev``, the base disks, ``Logs/...``, and in ``Snapshots/``
  the saved state of the live snapshot and the differencing images that
  VirtualBox attached to the running machine when it took ``vrs-temp``
  (written to while borg read the folder: not consistent, "in flight").
- ``Snapshot-Migrate`` (lines 152-182) saves the running VM's state instead
  (``controlvm savestate``) and archives the same way without a snapshot.
- A restore (``Snapshot-Restore``, lines 206-317) mounts the repository on
  the server (``borg mount``), walks down the archive until a folder has one
  ``*.vbox`` (lines 266-277), ``rsync --inplace --delete-before`` it into the
  VM folder (line 290), registers the ``.vbox`` (line 303), and if ``vrs-temp``
  is there, restores that snapshot and deletes it (lines 310-315).

Here the same archive restores without the VirtualBox round trip: the one
``.vbox`` is found, frozen at ``vrs-temp`` (:func:`vbremote._settings.freeze_instant`:
what VirtualBox writes after restoring and deleting it), and only the files
the frozen settings name are restored. The in-flight differencing images,
logs and ``.vbox-prev`` are not.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from typing import TYPE_CHECKING

from .._errors import ArchiveInvalid, ArchiveNotFound, SettingsFileError
from .._models import ArchiveContents, FileRole, ItemKind, SnapshotMode, StoredItem
from .._settings import MAX_SETTINGS_SIZE, freeze_instant
from ._checks import check_settings
from ._source import RestoreSource, SourceFile

if TYPE_CHECKING:
    from .._repository import Repository

__all__ = ["MAX_FILE_SIZE", "MAX_ITEMS", "TRANSIENT_SNAPSHOT", "foreign_source"]

_Refuse = Callable[..., ArchiveInvalid]

#: The name of the PowerShell tool's transient snapshot (virtualbox-remote-snapshots.ps1, lines 119 and 122).
TRANSIENT_SNAPSHOT = "vrs-temp"

#: At most this many items in the VM folder's part of the archive. A VM
#: folder holds a few dozen files (disks, differencing images, saved states,
#: logs); a million is an archive built to exhaust memory, not a VM.
MAX_ITEMS = 1_000_000

#: The largest file accepted: 64 TiB, above VirtualBox's own largest disk
#: images (VDI and VMDK stop at 2 TiB and 62 TiB); a larger size is a lie
#: that would make a restore preallocate or plan it.
MAX_FILE_SIZE = 64 << 40


def foreign_source(repository: Repository, archive_name: str, contents: ArchiveContents) -> RestoreSource:
    """What an archive without vbremote metadata restores (e.g. one of the PowerShell tool's).

    The archive must hold exactly one ``.vbox`` file; its folder in the
    archive is the VM folder. Its settings are frozen at the current
    snapshot when that is the tool's transient snapshot ``vrs-temp`` (the
    in-flight differencing images drop out), or taken as they are otherwise
    (the source's ``notes`` say so). The files restored are exactly those the
    frozen settings name (every hard disk of the media registry, the saved
    states and NVRAM files of the machine and its snapshots), with target
    paths relative to the VM folder and the archive's own chunk boundaries.

    Everything is checked before anything is written: every item under the
    VM folder must be a plain regular file or a directory (no symlinks,
    devices, FIFOs or hard links); at most :data:`MAX_ITEMS` items and
    :data:`MAX_FILE_SIZE` bytes a file; the settings file parses as
    VirtualBox's (no DOCTYPE or entities, at most
    :data:`vbremote._settings.MAX_SETTINGS_SIZE` bytes) and names only files
    inside the VM folder that the archive holds.

    Args:
        repository: The open repository.
        archive_name: The archive.
        contents: Its items, from :meth:`Repository.chunk_lists`.

    Returns:
        The source, with ``foreign=True``; its mode is ``online`` when the
        frozen state has a saved state (the VM restores ``Saved``), else
        ``offline``. The VirtualBox version and CPU are not known.

    Raises:
        ArchiveInvalid: Any of the checks above fails; the error names the
            archive (and the item, where one is at fault).
        ArchiveNotFound: No such archive.
        IntegrityError: The settings file's chunks fail verification.
    """
    location = repository.transport.location

    def refuse(message: str, path: str = "") -> ArchiveInvalid:
        return ArchiveInvalid(f"archive {archive_name!r}: {message}", location=location, archive=archive_name,
                              path=path)

    settings_item, folder, files = _vm_folder(contents, refuse)
    data = _read(repository, settings_item, refuse)

    settings, _ = check_settings(data, archive=archive_name, location=location)
    notes: list[str] = []
    transient = None
    if settings.current_snapshot is not None:
        for snapshot in settings.snapshots():
            if snapshot.uuid == settings.current_snapshot and snapshot.name == TRANSIENT_SNAPSHOT:
                transient = snapshot
    if transient is not None:
        try:
            data = freeze_instant(data, transient.uuid)
        except SettingsFileError as exc:
            raise refuse(f"its settings cannot be frozen at snapshot {TRANSIENT_SNAPSHOT!r}: {exc}") from exc
        notes.append(f"settings frozen at the transient snapshot {TRANSIENT_SNAPSHOT!r} ({{{transient.uuid}}}), "
                     f"taken {transient.time_stamp}")
    else:
        notes.append(f"no current snapshot {TRANSIENT_SNAPSHOT!r}: the settings are restored as they are")
    frozen_settings, references = check_settings(data, archive=archive_name, location=location)

    sources = []
    for reference in references:
        archive_path = posixpath.join(folder, reference.path) if folder else reference.path
        stored = files.get(archive_path)
        if stored is None:
            if reference.role is FileRole.NVRAM:
                # VirtualBox creates a missing NVRAM file on the next start (an
                # EFI machine that never ran has none).
                notes.append(f"{reference.what} ({reference.path}) is not in the archive")
                continue
            raise refuse(f"its settings name {reference.what} at {reference.path!r}, which the archive does not hold",
                         archive_path)
        chunks = stored.chunks
        assert chunks is not None  # plain files only, see _vm_folder
        sources.append(SourceFile(archive_path=archive_path, target_path=reference.path, role=reference.role,
                                  size=chunks.size, chunks=chunks.chunks))

    settings_path = posixpath.basename(settings_item.path)
    try:
        return RestoreSource(
            archive=archive_name,
            archive_id=_archive_id(repository, archive_name),
            vm_uuid=frozen_settings.uuid,
            vm_name=frozen_settings.name,
            mode=SnapshotMode.ONLINE if frozen_settings.state_file else SnapshotMode.OFFLINE,
            settings_path=settings_path,
            settings=data,
            files=sources,
            foreign=True,
            notes=notes,
        )
    except ValueError as exc:  # ConfigurationError: e.g. a file named like the settings file
        raise refuse(str(exc)) from exc


def _vm_folder(
    contents: ArchiveContents, refuse: _Refuse
) -> tuple[StoredItem, str, dict[str, StoredItem]]:
    """The one ``.vbox`` item, its folder in the archive, and the plain files under that folder by path."""
    candidates = [
        item for item in contents.items if item.path.endswith(".vbox") and item.kind is not ItemKind.DIRECTORY
    ]
    if not candidates:
        raise refuse("no VirtualBox settings file (.vbox) in the archive")
    if len(candidates) > 1:
        listed = ", ".join(repr(item.path) for item in candidates[:20])
        more = f" and {len(candidates) - 20} more" if len(candidates) > 20 else ""
        raise refuse(f"{len(candidates)} VirtualBox settings files (.vbox), not one: {listed}{more}")
    settings_item = candidates[0]
    folder = posixpath.dirname(settings_item.path)
    prefix = folder + "/" if folder else ""
    files: dict[str, StoredItem] = {}
    count = 0
    for item in contents.items:
        if item.path == "." or item.path == folder or not item.path.startswith(prefix):
            continue
        count += 1
        if count > MAX_ITEMS:
            raise refuse(f"more than {MAX_ITEMS} items in the VM folder")
        if item.kind is ItemKind.DIRECTORY:
            continue
        if not item.is_plain_file:
            kind = "hard link" if item.kind is ItemKind.FILE else item.kind.value.replace("_", " ")
            raise refuse(f"a {kind} in the VM folder; only regular files and folders are restored", item.path)
        assert item.chunks is not None
        if item.chunks.size > MAX_FILE_SIZE:
            raise refuse(f"a file of {item.chunks.size} bytes, more than {MAX_FILE_SIZE}", item.path)
        files[item.path] = item
    return settings_item, folder, files


def _read(repository: Repository, item: StoredItem, refuse: _Refuse) -> bytes:
    chunks = item.chunks
    assert chunks is not None
    if chunks.size > MAX_SETTINGS_SIZE:
        raise refuse(f"a settings file of {chunks.size} bytes, more than {MAX_SETTINGS_SIZE}", item.path)
    by_id: dict[bytes, bytes] = {}
    with repository.fetch(chunk.id for chunk in chunks.chunks) as stream:
        for fetched in stream:
            by_id[fetched.id] = fetched.data
    data = b"".join(by_id[chunk.id] for chunk in chunks.chunks)
    if len(data) != chunks.size:
        raise refuse(f"a settings file whose chunks hold {len(data)} bytes, not the {chunks.size} listed", item.path)
    return data


def _archive_id(repository: Repository, name: str) -> str:
    # Repository.archive() lists vbremote's archives only; the worker's listing has every archive.
    for listed, archive_id, _when, _comment in repository._worker.call("archives"):
        if listed == name:
            return str(archive_id)
    raise ArchiveNotFound(f"no archive named {name!r}", location=repository.transport.location, archive=name)
