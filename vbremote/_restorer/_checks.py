"""Checks of a settings file that came from an archive, before a restore uses it.

A restore registers the settings file it finds in an archive, and VirtualBox
then opens (and writes) every hard disk, saved state and NVRAM file that the
file names. An archive is input from a server that may be compromised, so
every such path must stay inside the target folder: relative, normalised,
POSIX-style, no ``..``. VirtualBox itself only ever writes forward slashes
(``ElementNode::setAttributePath`` replaces backslashes, src/VBox/Runtime/r3/xml.cpp,
6.1 to 7.2, which Settings.cpp uses for every path attribute), and paths
inside the machine folder relative to it (Machine::i_copyPathRelativeToMachine,
src/VBox/Main/src-server/MachineImpl.cpp), so a backslash, a Windows drive
letter or an absolute path is refused, not guessed at.

Both kinds of archives use these checks: vbremote's own (whose settings were
relocated when the snapshot was taken) and those of other tools.

Host references (:func:`host_references`, :func:`source_host_references`)
are the settings that give the VM something of the host beyond its own
files: a shared folder, a serial or parallel port on a host file, pipe or
device, a recording file, a host TPM, a NAT TFTP folder, a generic network
driver's settings, ``VBoxInternal`` ExtraData, a VMDK
descriptor whose extents are host files. Genuine VMs have them, so they are
not refused here: the Restorer reports them as preflight problems unless
the caller trusts the archive.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from attrs import frozen

from .._errors import ArchiveInvalid, ConfigurationError, RepositoryError, SettingsFileError
from .._models import FileRole, _check_archive_path
from .._settings import HostLink, MachineSettings, host_links, parse_settings
from ._images import image_drives

if TYPE_CHECKING:
    from .._repository import Repository
    from ._source import RestoreSource

__all__ = [
    "HostReference",
    "SettingsReference",
    "check_settings",
    "host_references",
    "settings_references",
    "source_host_references",
    "vmdk_extents",
]

#: Builds the error that names the archive: :class:`ArchiveInvalid` or
#: :class:`ArchiveMetadataError` (both take these arguments).
ErrorFactory = Callable[..., RepositoryError]

_DRIVE = re.compile(r"^[A-Za-z]:")


@frozen
class SettingsReference:
    """A file that a settings file names, checked to stay inside the VM folder.

    Attributes:
        path: Relative to the VM folder (the settings file's folder), normalised.
        role: What the file is to the VM.
        what: Which element names it, for messages (e.g. ``medium {uuid}``).
    """

    path: str
    role: FileRole
    what: str


def check_settings(
    data: bytes, *, archive: str, location: str = "", error: ErrorFactory = ArchiveInvalid
) -> tuple[MachineSettings, tuple[SettingsReference, ...]]:
    """Parse an archive's settings file and check every file it names.

    Args:
        data: The settings file's bytes, as the archive holds them.
        archive: The archive's name (for the error).
        location: The repository's location (for the error).
        error: The error class to raise, :class:`ArchiveInvalid` (the
            default) or :class:`ArchiveMetadataError`.

    Returns:
        The parsed settings and every file they name (see :func:`settings_references`).

    Raises:
        ArchiveInvalid: (or ``error``) The file is not a VirtualBox settings
            file, declares a DOCTYPE or entities, is too large, or names a
            file outside the VM folder.
    """
    try:
        settings = parse_settings(data)
    except SettingsFileError as exc:
        raise error(f"archive {archive!r}: its settings file is refused: {exc}", location=location,
                    archive=archive) from exc
    return settings, settings_references(settings, archive=archive, location=location, error=error)


def settings_references(
    settings: MachineSettings, *, archive: str, location: str = "", error: ErrorFactory = ArchiveInvalid
) -> tuple[SettingsReference, ...]:
    """Every file a settings file names, each checked to stay inside the VM folder.

    Named are: every hard disk of the media registry (the whole snapshot
    history's), the saved-state files of the machine and of its snapshots,
    and the NVRAM files of the machine and of its snapshots. The snapshot
    folder, where VirtualBox creates new files, is checked too. Optical and
    floppy images are not: VirtualBox only reads them, and a restore never
    writes them (an ISO outside the folder is normal).

    Args:
        settings: The parsed settings file.
        archive: The archive's name (for the error).
        location: The repository's location (for the error).
        error: The error class to raise.

    Returns:
        Each file once, in the order found: media, saved states, NVRAM files.

    Raises:
        ArchiveInvalid: (or ``error``) A path that is absolute, has a drive
            letter or a backslash, is not normalised or leaves the folder; one
            path named as two different kinds of file.
    """
    found: dict[str, SettingsReference] = {}
    for reference in _named(settings):
        path = _inside(reference.path, reference.what, archive=archive, location=location, error=error)
        earlier = found.get(path)
        if earlier is not None and earlier.role is not reference.role:
            raise error(
                f"archive {archive!r}: its settings name {path!r} both as {earlier.what} and as {reference.what}",
                location=location, archive=archive,
            )
        found.setdefault(path, SettingsReference(path=path, role=reference.role, what=reference.what))
    if settings.snapshot_folder:
        _inside(settings.snapshot_folder, "the snapshot folder", archive=archive, location=location, error=error)
    return tuple(found.values())


def _named(settings: MachineSettings) -> Iterator[SettingsReference]:
    for medium in settings.all_media():
        yield SettingsReference(medium.location, FileRole.DISK, f"medium {{{medium.uuid}}}")
    if settings.state_file:
        yield SettingsReference(settings.state_file, FileRole.STATE, "the machine's saved state")
    for snapshot in settings.snapshots():
        if snapshot.state_file:
            what = f"the saved state of snapshot {snapshot.name!r}"
            yield SettingsReference(snapshot.state_file, FileRole.STATE, what)
    if settings.nvram:
        yield SettingsReference(settings.nvram, FileRole.NVRAM, "the machine's NVRAM file")
    for snapshot in settings.snapshots():
        if snapshot.nvram:
            yield SettingsReference(snapshot.nvram, FileRole.NVRAM, f"the NVRAM file of snapshot {snapshot.name!r}")


def _inside(path: str, what: str, *, archive: str, location: str, error: ErrorFactory) -> str:
    problem = None
    if _DRIVE.match(path):
        problem = "a path with a drive letter"
    else:
        try:
            return _check_archive_path(path)
        except ConfigurationError as exc:
            problem = str(exc)
    raise error(
        f"archive {archive!r}: its settings name a file outside the VM folder ({what}: {path!r}; {problem})",
        location=location, archive=archive,
    )


# -- host references ----------------------------------------------------------


@frozen
class HostReference:
    """Something of the host that a restored VM would be given: a folder, a file, a device, a setting.

    Attributes:
        what: What names it, for messages (e.g. ``shared folder 'data'``,
            ``serial port 1 (RawFile) of snapshot 'base'``, ``ExtraData
            VBoxInternal/Devices/...``, ``extent 1 of the VMDK descriptor disk.vmdk``).
        value: The path, device, address or value, as written.
    """

    what: str
    value: str


#: ExtraData items whose names start so configure the VM's devices and
#: drivers directly (Console's CFGM overlay takes every ``VBoxInternal/`` key,
#: and ``VBoxInternal2/`` keys tune the API's settings, host paths included,
#: e.g. ``VBoxInternal2/Audio/Debug/PathOut``: i_configCfgmOverlay and
#: i_configDumpAPISettingsTweaks, src/VBox/Main/src-client/ConsoleImplConfigCommon.cpp, 7.1.12).
_EXTRADATA_PREFIXES = ("vboxinternal/", "vboxinternal2/")


def _inside_folder(path: str, folder: str | os.PathLike[str] | None) -> bool:
    """Whether an absolute ``path`` lies in ``folder`` (the VM folder a restore writes)."""
    if folder is None or not path.startswith("/"):
        return False
    normal = PurePosixPath(posixpath.normpath(path))
    return normal.is_relative_to(PurePosixPath(posixpath.normpath(os.fspath(folder)))) and ".." not in normal.parts


def _described(link: HostLink, folder: str | os.PathLike[str] | None) -> HostReference | None:
    owner = "" if link.snapshot is None else f" of snapshot {link.snapshot!r}"
    if link.kind == "shared-folder":
        # Always one: the guest reads (and may write) the host folder, wherever it is.
        return HostReference(f"shared folder {link.name!r}{owner}", link.value)
    if link.kind == "serial-port":
        if link.mode == "Disconnected" or (link.mode == "RawFile" and _inside_folder(link.value, folder)):
            return None
        return HostReference(f"serial port {link.name} ({link.mode or 'no mode'}){owner}", link.value)
    if link.kind == "parallel-port":
        return HostReference(f"parallel port {link.name}{owner}", link.value)
    if link.kind == "tftp":
        return HostReference(f"the TFTP folder of network adapter {link.name}{owner}", link.value)
    if link.kind == "generic-network":
        driver = link.mode or "no driver"
        return HostReference(f"a setting of network adapter {link.name} ({driver}){owner}", link.value)
    if link.kind == "tpm":
        return HostReference(f"TPM ({link.mode or 'no type'}){owner}", link.value)
    if link.kind == "recording":
        # "" and "." mean the default file in the machine folder; VirtualBox
        # itself only accepts absolute names (RecordingScreenSettings::getFilename
        # and setFilename, src/VBox/Main/src-server/RecordingScreenSettingsImpl.cpp, 7.1.12).
        if link.value in ("", ".") or _inside_folder(link.value, folder):
            return None
        return HostReference(f"recording file of screen {link.name}{owner}", link.value)
    if link.kind == "host-drive":
        # The guest reads (a floppy: writes) the host's own drive.
        return HostReference(f"host {link.mode or 'drive'} drive passed through at {link.name}{owner}", link.value)
    if link.kind == "extradata" and link.name.lower().startswith(_EXTRADATA_PREFIXES):
        return HostReference(f"ExtraData {link.name}", link.value)
    return None


def host_references(data: bytes, *, folder: str | os.PathLike[str] | None = None) -> tuple[HostReference, ...]:
    """Every host reference of an archived settings file, of the machine and of every snapshot.

    Listed are: each shared folder (wherever its host path is); each serial
    port with a host side (``RawFile``, ``HostPipe``, ``HostDevice``,
    ``TCP``); each parallel port with a host device; a host or external TPM;
    each recording file other than the default one; a NAT adapter's TFTP
    folder; each setting of a generic network driver (e.g. a VDE socket); each ExtraData item
    named ``VBoxInternal/...`` or ``VBoxInternal2/...``. A raw file or
    recording file inside ``folder`` (an absolute path in it, as VirtualBox
    writes them) is the VM's own and not listed. DVD and floppy images are
    not host references here (see :func:`settings_references`).

    Args:
        data: The settings file's bytes.
        folder: The VM folder the settings will be registered from, if known.

    Returns:
        The references, the machine's first, then each snapshot's, then the ExtraData items.

    Raises:
        SettingsFileError: The file is not a VirtualBox settings file (see
            :func:`vbremote._settings.parse_settings`).
    """
    found = (_described(link, folder) for link in host_links(data))
    return tuple(reference for reference in found if reference is not None)


# VMDK.cpp (src/VBox/Storage, 6.1.38 and 7.1.12): a file that does not start
# with the sparse magic "KDMV" is read as a text descriptor, its first 128 KiB
# at most (vmdkDescriptorRead, vmdkDescriptorReadAscii); an extent line
# starts with its access (RW, RDONLY, NOACCESS), then the size in sectors,
# the type (SPARSE, FLAT, ZERO, VMFS) and, but for ZERO, the file name,
# quoted or not (vmdkParseDescriptor, vmdkStringUnquote). A name starting
# with "/" is absolute; others are relative to the descriptor's folder. A
# monolithic sparse image has one extent, itself, whatever its embedded
# descriptor says (vmdkDescriptorReadSparse).
_VMDK_SPARSE_MAGIC = b"KDMV"
_VMDK_DESCRIPTOR_MAX = 128 << 10
_VMDK_EXTENT = re.compile(r"(?:RW|RDONLY|NOACCESS)\s*\S*?\s*(?P<type>SPARSE|FLAT|ZERO|VMFS)(?P<rest>.*)")


def vmdk_extents(head: bytes) -> tuple[str, ...]:
    """The extent file names of a VMDK text descriptor, as written.

    Args:
        head: The image file's first bytes (128 KiB, or all of a smaller file).

    Returns:
        Each extent's file name (``ZERO`` extents have none); nothing for a
        monolithic sparse image (its one extent is the file itself).
    """
    if head.startswith(_VMDK_SPARSE_MAGIC):
        return ()
    text = head[:_VMDK_DESCRIPTOR_MAX].split(b"\0", 1)[0].decode("utf-8", "replace")
    names: list[str] = []
    for line in text.split("\n"):
        match = _VMDK_EXTENT.match(line.rstrip("\r"))
        if match is None or match["type"] == "ZERO":
            continue
        rest = match["rest"].lstrip(" \t")
        quoted = rest.startswith('"')
        name = rest[1:].split('"', 1)[0] if quoted else next(iter(rest.split()), "")
        if name:
            names.append(name)
    return tuple(names)


def _extent_outside(name: str, descriptor: str) -> bool:
    """Whether an extent of the descriptor at ``descriptor`` (relative to the VM folder) leaves the folder."""
    if name.startswith("/"):
        return True
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(descriptor), name))
    return joined == ".." or joined.startswith("../")


def source_host_references(
    repository: Repository, source: RestoreSource, *, folder: str | os.PathLike[str] | None = None
) -> tuple[HostReference, ...]:
    """Every host reference of what an archive restores: its settings' and its VMDK descriptors'.

    The settings are :attr:`RestoreSource.settings` (see
    :func:`host_references`). A disk the settings register with format
    ``VMDK`` (or whose file ends in ``.vmdk``) is read from the archive, its
    first 128 KiB at most, and each extent that its text descriptor names
    outside the VM folder (an absolute path, such as a raw host disk, or a
    ``..`` that climbs out) is a reference.

    Args:
        repository: The open repository the source's chunks are in.
        source: What the archive restores.
        folder: The target VM folder.

    Returns:
        The settings' references, then the descriptors'.

    Raises:
        IntegrityError: A descriptor's chunk fails verification.
        SettingsFileError: The settings cannot be parsed.
    """
    references = list(host_references(source.settings, folder=folder))
    if folder is not None:
        # A DVD or floppy image outside the folder is a host file the guest reads, and a floppy one it
        # may write: VirtualBox gives DVD images the type Readonly and other images Writethrough
        # (Medium::initFromSettings, MediumImpl.cpp of 7.1.12), and attaches a floppy read-write when
        # the host file is writable (Console::i_configMedium, ConsoleImplConfigCommon.cpp). A missing
        # one is an image-missing problem instead (see _images.py).
        inside = Path(os.path.abspath(folder))
        for drive in image_drives(parse_settings(source.settings), inside):
            if not drive.image.is_relative_to(inside) and drive.image.exists():
                references.append(HostReference(f"the {drive.kind} image of the {drive.describe()}", str(drive.image)))
    formats = {posixpath.normpath(m.location): m.format for m in parse_settings(source.settings).all_media()}
    for item in source.files:
        if item.role is not FileRole.DISK:
            continue
        if formats.get(item.target_path, "").lower() != "vmdk" and not item.target_path.lower().endswith(".vmdk"):
            continue
        head = [chunk for chunk in item.chunks if chunk.offset < _VMDK_DESCRIPTOR_MAX]
        if not head:
            continue
        got: dict[bytes, bytes] = {}
        with repository.fetch([chunk.id for chunk in head]) as stream:
            for chunk in stream:
                got[chunk.id] = chunk.data
        data = b"".join(got[chunk.id] for chunk in head)
        for number, name in enumerate(vmdk_extents(data[:_VMDK_DESCRIPTOR_MAX]), start=1):
            if _extent_outside(name, item.target_path):
                references.append(HostReference(f"extent {number} of the VMDK descriptor {item.target_path}", name))
    return tuple(references)
