"""Rewrites of a restored VM's settings and disk images: moved files, a new identity.

- :func:`rewrite_paths` points the settings at files the caller placed
  elsewhere in the target folder (``_external/`` disks mapped by the caller).
- :func:`new_identity` gives the settings a new machine uuid and name and
  every hard disk a new uuid, for a restore as a new VM beside the current one.
- :func:`eject_images` empties the DVD and floppy drives that attach images
  missing on this host, and drops those images from the media registry.
- :func:`set_vdi_uuids` rewrites a VDI image's own uuid and its parent's, so
  that the images match the rewritten settings.

VirtualBox refuses to register a machine whose uuid, or a medium whose uuid,
it already knows (VirtualBox::i_registerMachine and
VirtualBox::i_checkMediaForConflicts, src/VBox/Main/src-server/VirtualBoxImpl.cpp
of 7.1.12), and it reads a VDI's uuid from its header when it opens it and
refuses one that differs from the registry's (Medium::i_queryInfo,
src/VBox/Main/src-server/MediumImpl.cpp: "UUID {..} of the medium does not
match the value {..} stored in the media registry"). So a second copy of a VM
needs new uuids in both places.
"""

from __future__ import annotations

import os
import uuid as uuid_module
from collections.abc import Iterable, Mapping
from pathlib import Path

from .._errors import SettingsFileError
from .._settings import _N, _bare, _braced, _dump, _load, _machine, _version

__all__ = ["eject_images", "new_identity", "rewrite_paths", "set_vdi_uuids", "settings_with", "vdi_uuids"]

# VDI 1.1: a 72-byte pre-header (text, signature, version), then the header,
# whose uuids start 0x188 bytes into the file: the image's own, its last
# modification, its parent's (linkage) and the parent's modification
# (VDIHEADER1 in src/VBox/Storage/VDICore.h).
_VDI_SIGNATURE = 0xBEDA107F
_VDI_UUID_AT = 0x188
_VDI_PARENT_AT = 0x1A8
_VDI_HEAD = 0x200


def rewrite_paths(data: bytes, mapping: Mapping[str, str]) -> bytes:
    """The settings with every file path that is a key of ``mapping`` replaced by its value.

    Hard-disk locations, state files and NVRAM paths (machine and snapshots) are rewritten.

    Raises:
        SettingsFileError: Not a readable settings file.
    """
    prolog, root = _load(data)
    _version(root)
    machine = _machine(root)
    for element in machine.iter():
        for attribute in ("location", "stateFile", "path"):
            value = element.get(attribute)
            if value is not None and value in mapping:
                if attribute == "location" and element.tag != _N + "HardDisk":
                    continue
                if attribute == "path" and element.tag != _N + "NVRAM":
                    continue
                element.set(attribute, mapping[value])
    return _dump(prolog, root)


def settings_with(data: bytes, *, drop_state: bool = False, cpu_portability_level: int | None = None) -> bytes:
    """The settings without the machine's saved state (it restores ``PoweredOff``), and/or a CPU portability level.

    The machine's ``stateFile`` attribute is what makes VirtualBox load it as
    ``Saved`` (MachineConfigFile::readMachine and Machine::i_loadMachineDataFromSettings,
    src/VBox/Main/src-server/MachineImpl.cpp); the level is
    ``Hardware/CPU/CpuIdPortabilityLevel`` (buildHardwareXML, Settings.cpp of 7.1.12).

    Raises:
        SettingsFileError: Not a readable settings file.
    """
    prolog, root = _load(data)
    _version(root)
    machine = _machine(root)
    if drop_state and "stateFile" in machine.attrib:
        del machine.attrib["stateFile"]
    if cpu_portability_level is not None:
        cpu = machine.find(f"{_N}Hardware/{_N}CPU")
        if cpu is None:
            hardware = machine.find(_N + "Hardware")
            if hardware is None:
                raise SettingsFileError("the settings file has no Hardware element")
            cpu = hardware.makeelement(_N + "CPU", {})
            hardware.insert(0, cpu)
        cpu.set("CpuIdPortabilityLevel", str(cpu_portability_level))
    return _dump(prolog, root)


def eject_images(data: bytes, uuids: Iterable[str]) -> bytes:
    """The settings with every DVD or floppy drive that attaches one of these images empty, and the images gone.

    An empty drive is an ``AttachedDevice`` of type ``DVD`` or ``Floppy``
    without an ``Image`` (nor ``HostDrive``) child: MachineConfigFile::
    buildStorageControllersXML writes the ``Image`` element only for a
    non-zero medium uuid, and readStorageControllers reads a device without
    one as an empty drive (src/VBox/Main/xml/Settings.cpp, 6.1.38 and 7.1.12).
    The machine's and every snapshot's hardware (in both storage layouts) are
    rewritten; the images leave the registry's ``DVDImages``/``FloppyImages``,
    and a holder left empty goes too (buildMediaRegistry writes none when a
    list is empty). Everything else is kept.

    Args:
        data: The settings file.
        uuids: The images' medium uuids.

    Returns:
        The rewritten settings file (``data`` itself when no uuid is given).

    Raises:
        SettingsFileError: Not a readable settings file.
    """
    wanted = {_bare(uuid) for uuid in uuids}
    if not wanted:
        return data
    prolog, root = _load(data)
    _version(root)
    machine = _machine(root)
    for device in machine.iter(_N + "AttachedDevice"):
        if device.get("type") not in ("DVD", "Floppy"):
            continue
        for image in device.findall(_N + "Image"):
            if _bare(image.get("uuid", "")) in wanted:
                device.remove(image)
                if not len(device):
                    device.text = None  # written as VirtualBox writes an empty drive: <AttachedDevice .../>
    registry = machine.find(_N + "MediaRegistry")
    for holder_name in ("DVDImages", "FloppyImages"):
        holder = registry.find(_N + holder_name) if registry is not None else None
        if holder is None or registry is None:
            continue
        for image in holder.findall(_N + "Image"):
            if _bare(image.get("uuid", "")) in wanted:
                holder.remove(image)
        if not len(holder):
            registry.remove(holder)
    return _dump(prolog, root)


def new_identity(data: bytes, *, name: str) -> tuple[bytes, str, dict[str, str]]:
    """The settings of a copy: a new machine uuid and name, new uuids for every hard disk.

    The media registry, the attachments of the current state and of every
    snapshot follow the new uuids; DVD and floppy images keep theirs (they are
    shared, not copied).

    Returns:
        The rewritten settings, the new machine uuid, and each old disk uuid's new one.

    Raises:
        SettingsFileError: Not a readable settings file.
    """
    prolog, root = _load(data)
    _version(root)
    machine = _machine(root)
    machine_uuid = str(uuid_module.uuid4())
    machine.set("uuid", _braced(machine_uuid))
    machine.set("name", name)
    media: dict[str, str] = {}
    for disk in machine.iter(_N + "HardDisk"):
        old = disk.get("uuid")
        if old:
            media[_bare(old)] = str(uuid_module.uuid4())
            disk.set("uuid", _braced(media[_bare(old)]))
    for image in machine.iter(_N + "Image"):
        old = image.get("uuid")
        if old and _bare(old) in media:
            image.set("uuid", _braced(media[_bare(old)]))
    return _dump(prolog, root), machine_uuid, media


def vdi_uuids(path: str | os.PathLike[str]) -> tuple[str, str] | None:
    """A VDI image's own uuid and its parent's (nil for a base), or None if it is not a VDI."""
    with open(path, "rb") as f:
        head = f.read(_VDI_HEAD)
    if len(head) < _VDI_HEAD or int.from_bytes(head[0x40:0x44], "little") != _VDI_SIGNATURE:
        return None
    own = uuid_module.UUID(bytes_le=head[_VDI_UUID_AT:_VDI_UUID_AT + 16])
    parent = uuid_module.UUID(bytes_le=head[_VDI_PARENT_AT:_VDI_PARENT_AT + 16])
    return str(own), str(parent)


def set_vdi_uuids(path: str | os.PathLike[str], media: Mapping[str, str]) -> bool:
    """Rewrite a VDI's own uuid and its parent's through ``media`` (old uuid -> new), in place, durably.

    Returns:
        Whether the file is a VDI (anything else is left alone).
    """
    found = vdi_uuids(path)
    if found is None:
        return False
    own, parent = found
    with open(Path(path), "r+b") as f:
        if own in media:
            f.seek(_VDI_UUID_AT)
            f.write(uuid_module.UUID(media[own]).bytes_le)
        if parent in media:
            f.seek(_VDI_PARENT_AT)
            f.write(uuid_module.UUID(media[parent]).bytes_le)
        f.flush()
        os.fsync(f.fileno())
    return True
