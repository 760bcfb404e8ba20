"""The VirtualBox settings file (``.vbox``): a small typed model and the rewrites vbremote needs.

- :func:`parse_settings` reads the parts vbremote uses: the machine, its media
  registry (with nested differencing disks), the snapshot tree, the current
  snapshot, the saved-state file, the storage attachments and the NVRAM file.
- :func:`freeze_instant` rewrites a settings file taken right after a
  transient snapshot so that it describes the frozen instant as the
  machine's current state (see docs: "What a snapshot archive contains").
- :func:`relocate` maps the paths in a settings file to a new VM folder.

Everything else in the file is kept as it is. Settings files are untrusted
input here (they come from archives): they are parsed by defusedxml, which
refuses a DOCTYPE, entity declarations and external references whatever the
document's encoding; oversized files, documents that are not UTF-8 and paths
that escape the VM folder are refused too.

Layouts. VirtualBox 6.1 to 7.2 write several layouts, and all of them are
read and rewritten here (src/VBox/Main/xml/Settings.cpp of 6.1.38, 7.0.18,
7.1.12 and the 7.2 tree):

- ``StorageControllers`` is a child of ``Hardware`` from settings version
  1.17 on, and a sibling of ``Hardware`` (under ``Machine`` and under each
  ``Snapshot``) before: MachineConfigFile::buildHardwareXML picks the parent
  with ``m->sv >= SettingsVersion_v1_17``. VirtualBox 6.0 wrote the sibling
  layout in 1.17 files too, and readMachine, readSnapshot and readHardware
  accept both places in every version, so the version does not tell the
  layout: both places are read (and rewritten) everywhere.
- The NVRAM file is ``Hardware/BIOS/NVRAM/@path`` up to 1.19 and
  ``Hardware/Firmware/NVRAM/@path`` from 1.20 on (buildHardwareXML: "Since
  settings v1.20 the rest also gets stored in Firmware"; readHardware reads
  the one the version names). A snapshot's hardware names its own copy,
  ``Snapshots/<timestamp>.nvram`` (Machine::i_getSnapshotNVRAMFilename,
  copied by SessionMachine::takeSnapshotHandler, MachineImpl.cpp and
  SnapshotImpl.cpp).
- From 1.20 on a ``Platform`` element (chipset, CPU, ...) is a sibling of
  ``Hardware`` under ``Machine`` and under each ``Snapshot``
  (buildPlatformXML, called from buildMachineXML and buildSnapshotXML);
  before, those settings sit in ``Hardware``.
"""

from __future__ import annotations

import copy
import posixpath
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping

from attrs import frozen
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import DefusedXMLParser

from ._errors import SettingsFileError

__all__ = [
    "MAX_SETTINGS_SIZE",
    "Attachment",
    "HostLink",
    "Image",
    "MachineSettings",
    "Medium",
    "SnapshotNode",
    "freeze_instant",
    "host_links",
    "parse_settings",
    "relocate",
]

NS = "http://www.virtualbox.org/"
_N = "{" + NS + "}"

#: Settings files larger than this are refused (real ones are a few hundred KiB at most).
MAX_SETTINGS_SIZE = 16 << 20

# VirtualBox refuses deeper snapshot trees and medium trees (include/VBox/settings.h:
# SETTINGS_SNAPSHOT_DEPTH_MAX, SETTINGS_MEDIUM_DEPTH_MAX; MachineConfigFile::readSnapshot,
# ConfigFileBase::readMediumOne), and no element of its files nests deeper than a
# snapshot tree of that depth (two elements a level) with its hardware inside.
_SNAPSHOT_DEPTH_MAX = 250
_MEDIUM_DEPTH_MAX = 300
_ELEMENT_DEPTH_MAX = 2 * _SNAPSHOT_DEPTH_MAX + 64

_ROOT_START = re.compile(rb"<(?:[A-Za-z_][\w.-]*:)?VirtualBox[\s>]")
_VERSION = re.compile(r"(\d+)\.(\d+)(?:-\w+)?")

#: The children of a ``Snapshot`` that hold the state of its machine, and that
#: ``Machine`` holds for the current state (MachineConfigFile::buildSnapshotXML
#: and buildMachineXML): hardware, storage controllers in the layout before
#: 1.17, the platform from 1.20 on, debugging, autostart and recording settings
#: (``VideoCapture`` before 1.19).
_STATE_ELEMENTS = ("Hardware", "StorageControllers", "Platform", "Debugging", "Autostart", "Recording", "VideoCapture")

#: VirtualBox's default snapshot folder (Machine::setSnapshotFolder, MachineImpl.cpp).
_DEFAULT_SNAPSHOT_FOLDER = "Snapshots"


@frozen
class Medium:
    """A medium in the machine's media registry.

    Attributes:
        uuid: The medium's uuid (no braces, lower case).
        location: Its path as written (relative to the VM folder, or absolute).
        format: ``VDI``, ``VMDK`` …
        type: ``Normal``, ``Immutable`` … where given.
        children: Differencing media based on it.
    """

    uuid: str
    location: str
    format: str
    type: str | None
    children: tuple[Medium, ...]


@frozen
class Image:
    """A DVD or floppy image in the machine's media registry (``DVDImages``, ``FloppyImages``).

    Attributes:
        uuid: The image's uuid (no braces, lower case).
        location: Its path as written (relative to the VM folder, or absolute).
        kind: ``DVD`` or ``Floppy``.
    """

    uuid: str
    location: str
    kind: str


@frozen
class Attachment:
    """A device attached to a storage controller.

    Attributes:
        controller: The controller's name.
        port: Its port.
        device: Its device number.
        type: ``HardDisk``, ``DVD``, ``Floppy``.
        medium: The attached medium's uuid, or ``None`` (an empty drive).
    """

    controller: str
    port: int
    device: int
    type: str
    medium: str | None


@frozen
class SnapshotNode:
    """A snapshot in the snapshot tree.

    Attributes:
        uuid: The snapshot's uuid.
        name: Its name.
        time_stamp: When it was taken, as written (ISO 8601, UTC).
        state_file: Its saved-state file (online snapshots), or ``None``.
        attachments: The storage attachments of its hardware.
        children: Snapshots taken after it, on top of it.
        nvram: The NVRAM file its hardware names (EFI machines: its own
            copy, ``Snapshots/<timestamp>.nvram``), or ``None``.
    """

    uuid: str
    name: str
    time_stamp: str
    state_file: str | None
    attachments: tuple[Attachment, ...]
    children: tuple[SnapshotNode, ...]
    nvram: str | None = None

    def walk(self) -> Iterator[SnapshotNode]:
        """This snapshot and all below it, depth first."""
        yield self
        for child in self.children:
            yield from child.walk()


@frozen
class MachineSettings:
    """What vbremote reads from a ``.vbox`` file.

    Attributes:
        uuid: The machine's uuid.
        name: Its name.
        state_file: The saved-state file (the machine is Saved), or ``None``.
        current_snapshot: The current snapshot's uuid, or ``None``.
        snapshot_folder: The snapshot folder, as written.
        media: The media registry's hard disks (trees).
        attachments: The current hardware's storage attachments.
        snapshot: The root of the snapshot tree, or ``None``.
        nvram: The NVRAM file (EFI machines), or ``None``.
        version: The settings version, e.g. ``"1.19"`` (without the host suffix).
        current_state_modified: Whether the current state differs from the
            current snapshot (``Machine/@currentStateModified``, true when absent).
        images: The media registry's DVD and floppy images.
    """

    uuid: str
    name: str
    state_file: str | None
    current_snapshot: str | None
    snapshot_folder: str | None
    media: tuple[Medium, ...]
    attachments: tuple[Attachment, ...]
    snapshot: SnapshotNode | None
    nvram: str | None
    version: str = ""
    current_state_modified: bool = True
    images: tuple[Image, ...] = ()

    def all_media(self) -> Iterator[Medium]:
        """Every hard disk in the registry, parents before children."""
        stack = list(reversed(self.media))
        while stack:
            medium = stack.pop()
            yield medium
            stack.extend(reversed(medium.children))

    def medium(self, uuid: str) -> Medium:
        """The registered hard disk with this uuid.

        Raises:
            KeyError: None.
        """
        wanted = _bare(uuid)
        for medium in self.all_media():
            if medium.uuid == wanted:
                return medium
        raise KeyError(uuid)

    def chain(self, uuid: str) -> tuple[Medium, ...]:
        """A medium and its parents up to the base, base first."""
        wanted = _bare(uuid)

        def search(media: tuple[Medium, ...], path: tuple[Medium, ...]) -> tuple[Medium, ...] | None:
            for medium in media:
                here = (*path, medium)
                if medium.uuid == wanted:
                    return here
                found = search(medium.children, here)
                if found:
                    return found
            return None

        found = search(self.media, ())
        if found is None:
            raise KeyError(uuid)
        return found

    def snapshots(self) -> Iterator[SnapshotNode]:
        """Every snapshot, depth first."""
        if self.snapshot is not None:
            yield from self.snapshot.walk()


def _bare(uuid: str) -> str:
    return uuid.strip().strip("{}").lower()


def _braced(uuid: str) -> str:
    return "{" + _bare(uuid) + "}"


# -- reading ----------------------------------------------------------------


def _load(data: bytes) -> tuple[bytes, ET.Element]:
    """The prolog (declaration and comments before the root) and the parsed root."""
    if len(data) > MAX_SETTINGS_SIZE:
        raise SettingsFileError(f"settings file is {len(data)} bytes, more than {MAX_SETTINGS_SIZE}")
    # defusedxml refuses a DOCTYPE (and so any entity or external reference)
    # in whatever encoding expat detects (UTF-16 without a byte-order mark
    # included): VirtualBox never writes one. Nothing is expanded or fetched.
    parser = DefusedXMLParser(target=ET.TreeBuilder(insert_comments=True), forbid_dtd=True)
    try:
        parser.feed(data)
        root = parser.close()
    except DefusedXmlException as exc:
        raise SettingsFileError(
            f"settings file declares a DOCTYPE, entities or external references; VirtualBox never writes those "
            f"({type(exc).__name__})"
        ) from exc
    except ET.ParseError as exc:
        raise SettingsFileError(f"settings file is not well-formed XML: {exc}") from exc
    except (ValueError, LookupError) as exc:  # pyexpat: e.g. "multi-byte encodings are not supported"
        raise SettingsFileError(f"settings file cannot be read: {exc}") from exc
    # VirtualBox writes UTF-8 (xml::XmlFileWriter); the rewrites below keep the
    # prolog and write UTF-8, so anything else is refused.
    if b"\x00" in data or data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise SettingsFileError("settings file is not UTF-8")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SettingsFileError("settings file is not UTF-8") from exc
    if root.tag != _N + "VirtualBox":
        raise SettingsFileError(f"not a VirtualBox settings file (root element {root.tag!r})")
    machine = root.find(_N + "Machine")
    if machine is None:
        raise SettingsFileError("settings file has no Machine element")
    _check_depth(root)
    start = _ROOT_START.search(data)
    prolog = data[: start.start()] if start else b""
    return prolog, root


def _check_depth(root: ET.Element) -> None:
    """Refuse nesting deeper than VirtualBox allows (the walks below recurse; this check does not)."""
    snapshot, medium = _N + "Snapshot", _N + "HardDisk"
    stack = [(root, 1, 0, 0)]
    while stack:
        element, depth, snapshots, media = stack.pop()
        snapshots += element.tag == snapshot
        media += element.tag == medium
        if depth > _ELEMENT_DEPTH_MAX:
            raise SettingsFileError(f"settings file nests elements deeper than {_ELEMENT_DEPTH_MAX}")
        if snapshots > _SNAPSHOT_DEPTH_MAX:
            raise SettingsFileError(f"maximum snapshot tree depth of {_SNAPSHOT_DEPTH_MAX} exceeded")
        if media > _MEDIUM_DEPTH_MAX:
            raise SettingsFileError(f"maximum medium tree depth of {_MEDIUM_DEPTH_MAX} exceeded")
        stack.extend((child, depth + 1, snapshots, media) for child in element)


def _dump(prolog: bytes, root: ET.Element) -> bytes:
    # VirtualBox writes its namespace as the default one. ElementTree's own
    # default_namespace option refuses unqualified attributes (all of them
    # here), and register_namespace would change state for the whole process;
    # so the tags lose their namespace and the root carries xmlns.
    for element in root.iter():
        if isinstance(element.tag, str) and element.tag.startswith(_N):
            element.tag = element.tag[len(_N) :]
    attributes = dict(root.attrib)
    root.attrib.clear()
    root.set("xmlns", NS)
    root.attrib.update(attributes)
    body = ET.tostring(root, encoding="unicode")
    if not prolog.strip():
        prolog = b'<?xml version="1.0"?>\n'
    return prolog + body.encode("utf-8") + b"\n"


def _machine(root: ET.Element) -> ET.Element:
    machine = root.find(_N + "Machine")
    assert machine is not None  # checked by _load
    return machine


def _version(root: ET.Element) -> tuple[int, int]:
    """The settings version of ``VirtualBox/@version`` (``"1.19-linux"`` is ``(1, 19)``).

    Raises:
        SettingsFileError: No version, or not one (VirtualBox refuses those
            too: ConfigFileBase::parseVersion, "Cannot handle settings version").
    """
    text = root.get("version", "")
    match = _VERSION.fullmatch(text)
    if match is None:
        raise SettingsFileError(f"settings file has no valid version ({text!r})")
    return int(match[1]), int(match[2])


def _required(element: ET.Element, name: str) -> str:
    value = element.get(name)
    if value is None:
        raise SettingsFileError(f"{element.tag.removeprefix(_N)} element without {name!r}")
    return value


def _media(parent: ET.Element) -> tuple[Medium, ...]:
    out = []
    for disk in parent.findall(_N + "HardDisk"):
        out.append(
            Medium(
                uuid=_bare(_required(disk, "uuid")),
                location=_required(disk, "location"),
                format=disk.get("format", ""),
                type=disk.get("type"),
                children=_media(disk),
            )
        )
    return tuple(out)


def _images(registry: ET.Element | None) -> tuple[Image, ...]:
    out = []
    for holder, kind in (("DVDImages", "DVD"), ("FloppyImages", "Floppy")):
        found = registry.find(_N + holder) if registry is not None else None
        for image in found.findall(_N + "Image") if found is not None else ():
            out.append(Image(uuid=_bare(_required(image, "uuid")), location=_required(image, "location"), kind=kind))
    return tuple(out)


def _controllers(owner: ET.Element) -> Iterator[ET.Element]:
    """The storage controllers of a ``Machine`` or ``Snapshot``, in both layouts.

    ``Hardware/StorageControllers`` (1.17 on) and ``StorageControllers`` beside
    ``Hardware`` (before 1.17, and 1.17 files of VirtualBox 6.0): readHardware
    reads the first, readMachine and readSnapshot the second, in every version
    (src/VBox/Main/xml/Settings.cpp, 6.1.38 to 7.2).
    """
    holders = owner.findall(_N + "Hardware/" + _N + "StorageControllers") + owner.findall(_N + "StorageControllers")
    for holder in holders:
        yield from holder.findall(_N + "StorageController")


def _attachments(owner: ET.Element) -> tuple[Attachment, ...]:
    out = []
    for controller in _controllers(owner):
        for device in controller.findall(_N + "AttachedDevice"):
            image = device.find(_N + "Image")
            try:
                out.append(
                    Attachment(
                        controller=_required(controller, "name"),
                        port=int(device.get("port", "0")),
                        device=int(device.get("device", "0")),
                        type=_required(device, "type"),
                        medium=_bare(_required(image, "uuid")) if image is not None else None,
                    )
                )
            except ValueError as exc:
                raise SettingsFileError(f"bad storage attachment: {exc}") from exc
    return tuple(out)


def _nvram_elements(owner: ET.Element, version: tuple[int, int]) -> list[ET.Element]:
    """The ``NVRAM`` element of a ``Machine`` or ``Snapshot`` where its version puts it.

    ``Hardware/BIOS/NVRAM`` before 1.20, ``Hardware/Firmware/NVRAM`` from 1.20
    on (MachineConfigFile::buildHardwareXML and readHardware, Settings.cpp of
    7.1.12 and 7.2; 6.1.38 writes ``BIOS/NVRAM``).
    """
    firmware = "Firmware" if version >= (1, 20) else "BIOS"
    return owner.findall(f"{_N}Hardware/{_N}{firmware}/{_N}NVRAM")


def _nvram(owner: ET.Element, version: tuple[int, int]) -> str | None:
    for element in _nvram_elements(owner, version):
        path = element.get("path")
        if path:
            return path
    return None


def _snapshot(element: ET.Element, version: tuple[int, int]) -> SnapshotNode:
    container = element.find(_N + "Snapshots")
    children = (
        () if container is None else tuple(_snapshot(s, version) for s in container.findall(_N + "Snapshot"))
    )
    return SnapshotNode(
        uuid=_bare(_required(element, "uuid")),
        name=element.get("name", ""),
        time_stamp=element.get("timeStamp", ""),
        state_file=element.get("stateFile"),
        attachments=_attachments(element),
        children=children,
        nvram=_nvram(element, version),
    )


def parse_settings(data: bytes) -> MachineSettings:
    """Read a ``.vbox`` file, in any layout VirtualBox 6.1 to 7.2 writes.

    Args:
        data: The file's bytes.

    Returns:
        The parts vbremote uses.

    Raises:
        SettingsFileError: Not a VirtualBox settings file, malformed, hostile or too large.
    """
    _, root = _load(data)
    version = _version(root)
    machine = _machine(root)
    registry = machine.find(_N + "MediaRegistry")
    disks = registry.find(_N + "HardDisks") if registry is not None else None
    snapshot = machine.find(_N + "Snapshot")
    current = machine.get("currentSnapshot")
    return MachineSettings(
        uuid=_bare(_required(machine, "uuid")),
        name=_required(machine, "name"),
        state_file=machine.get("stateFile"),
        current_snapshot=_bare(current) if current else None,
        snapshot_folder=machine.get("snapshotFolder"),
        media=_media(disks) if disks is not None else (),
        attachments=_attachments(machine),
        snapshot=_snapshot(snapshot, version) if snapshot is not None else None,
        nvram=_nvram(machine, version),
        version=f"{version[0]}.{version[1]}",
        # readMachine: absent means true (Settings.cpp).
        current_state_modified=machine.get("currentStateModified", "true") != "false",
        images=_images(registry),
    )


@frozen
class HostLink:
    """A setting that points the VM at something of the host, outside its own files.

    Attributes:
        kind: ``shared-folder``, ``serial-port``, ``parallel-port``,
            ``recording``, ``tpm``, ``tftp``, ``generic-network``, ``host-drive`` or ``extradata``.
        name: The shared folder's name, the port's or network adapter's
            slot, the recording screen, the ExtraData item's name ("" where
            there is none).
        mode: A serial port's ``hostMode``, a TPM's ``type``, a generic
            network driver's name ("" otherwise).
        value: The path, device, address or value, as written.
        snapshot: The name of the snapshot whose hardware holds it, or
            ``None`` for the machine's current state.
    """

    kind: str
    name: str
    mode: str
    value: str
    snapshot: str | None = None


def _hardware_links(owner: ET.Element, snapshot: str | None) -> Iterator[HostLink]:
    """The host links of one ``Machine`` or ``Snapshot``: its hardware's and its recording settings'.

    Element and attribute names as MachineConfigFile::readHardware reads them
    (``SharedFolders/SharedFolder@hostPath``; ``UART`` or ``Uart``
    ``/Port@hostMode,path`` by readSerialPorts; ``LPT`` or ``Lpt``
    ``/Port@path`` by readParallelPorts; ``TrustedPlatformModule@type,location``;
    ``Network/Adapter`` with ``NAT/TFTP@prefix``, the host folder NAT's TFTP
    server serves the guest, and ``GenericInterface@driver`` with its
    ``Property@name,value``, e.g. a VDE socket, by readNetworkAdapters and
    readAttachedNetworkMode, disabled modes under ``DisabledModes`` included),
    src/VBox/Main/xml/Settings.cpp of 6.1.38 and 7.1.12. Recording settings
    are read by readRecordingSettings: ``VideoCapture@file`` before settings
    1.19 (6.1 writes it beside ``Hardware``, 7.1 inside it), ``Recording/Screen@file``
    from 1.19 on (beside ``Hardware``); every place is read whatever the version.
    """
    for hardware in owner.findall(_N + "Hardware"):
        for folder in hardware.findall(f"{_N}SharedFolders/{_N}SharedFolder"):
            yield HostLink("shared-folder", folder.get("name", ""), "", folder.get("hostPath", ""), snapshot)
        for tag in ("UART", "Uart"):
            for port in hardware.findall(f"{_N}{tag}/{_N}Port"):
                mode = port.get("hostMode", "")
                if port.get("path") or mode not in ("", "Disconnected"):
                    yield HostLink("serial-port", port.get("slot", ""), mode, port.get("path", ""), snapshot)
        for tag in ("LPT", "Lpt"):
            for port in hardware.findall(f"{_N}{tag}/{_N}Port"):
                if port.get("path"):
                    yield HostLink("parallel-port", port.get("slot", ""), "", port.get("path", ""), snapshot)
        for adapter in hardware.findall(f"{_N}Network/{_N}Adapter"):
            slot = adapter.get("slot", "")
            for tftp in adapter.iter(_N + "TFTP"):
                if tftp.get("prefix"):
                    yield HostLink("tftp", slot, "", tftp.get("prefix", ""), snapshot)
            for generic in adapter.iter(_N + "GenericInterface"):
                for item in generic.findall(_N + "Property"):
                    value = f"{item.get('name', '')}={item.get('value', '')}"
                    yield HostLink("generic-network", slot, generic.get("driver", ""), value, snapshot)
        for tpm in hardware.findall(_N + "TrustedPlatformModule"):
            kind = tpm.get("type", "")
            if kind in ("Host", "Swtpm") or tpm.get("location"):
                yield HostLink("tpm", "", kind, tpm.get("location", ""), snapshot)
    # A host's optical or floppy drive passed to the guest: ``AttachedDevice/HostDrive@src``
    # (readStorageControllers), or before settings 1.9 ``Hardware/DVDDrive|FloppyDrive/HostDrive@src``
    # (readDVDAndFloppies_pre1_9), Settings.cpp of 7.1.12.
    for controllers in [*owner.findall(_N + "StorageControllers"),
                        *owner.findall(f"{_N}Hardware/{_N}StorageControllers")]:
        for controller in controllers.findall(_N + "StorageController"):
            for device in controller.findall(_N + "AttachedDevice"):
                for drive in device.findall(_N + "HostDrive"):
                    at_port, at_device = device.get("port", "0"), device.get("device", "0")
                    where = f"{controller.get('name', '')} port {at_port} device {at_device}"
                    yield HostLink("host-drive", where, device.get("type", ""), drive.get("src", ""), snapshot)
    for kind in ("DVDDrive", "FloppyDrive"):
        for drive in owner.findall(f"{_N}Hardware/{_N}{kind}/{_N}HostDrive"):
            yield HostLink("host-drive", kind, kind.removesuffix("Drive"), drive.get("src", ""), snapshot)
    capture = [*owner.findall(_N + "VideoCapture"), *owner.findall(f"{_N}Hardware/{_N}VideoCapture")]
    for element in capture:
        if element.get("file"):
            yield HostLink("recording", "0", "", element.get("file", ""), snapshot)
    for recording in owner.findall(_N + "Recording"):
        for screen in [recording, *recording.findall(_N + "Screen")]:
            if screen.get("file"):
                yield HostLink("recording", screen.get("id", "0"), "", screen.get("file", ""), snapshot)


def host_links(data: bytes) -> tuple[HostLink, ...]:
    """Every setting of a ``.vbox`` file that points the VM at the host.

    Shared folders, serial and parallel ports with a host side, a host or
    external TPM, recording files, NAT TFTP folders and generic network
    drivers' settings, of the machine's current state and of
    every snapshot's hardware (snapshots carry their own), and the
    machine's ExtraData items (``ExtraData/ExtraDataItem@name,value``,
    ConfigFileBase::readExtraData; snapshots have none). Whether one is
    harmful is the caller's to judge.

    Args:
        data: The file's bytes.

    Returns:
        The machine's links, then each snapshot's (depth first), then the ExtraData items.

    Raises:
        SettingsFileError: Not a VirtualBox settings file, malformed, hostile or too large.
    """
    _, root = _load(data)
    _version(root)
    machine = _machine(root)
    links = list(_hardware_links(machine, None))
    for snapshot in machine.iter(_N + "Snapshot"):
        links.extend(_hardware_links(snapshot, snapshot.get("name", "")))
    for item in machine.findall(f"{_N}ExtraData/{_N}ExtraDataItem"):
        links.append(HostLink("extradata", item.get("name", ""), "", item.get("value", "")))
    return tuple(links)


# -- the frozen instant -------------------------------------------------------


def _find_snapshot(machine: ET.Element, uuid: str) -> tuple[ET.Element, ET.Element, ET.Element | None]:
    """The snapshot element, the element that holds it, and its parent snapshot element."""
    wanted = _bare(uuid)

    Found = tuple[ET.Element, ET.Element, ET.Element | None]

    def search(holder: ET.Element, parent: ET.Element | None) -> Found | None:
        for snapshot in holder.findall(_N + "Snapshot"):
            if _bare(snapshot.get("uuid", "")) == wanted:
                return snapshot, holder, parent
            container = snapshot.find(_N + "Snapshots")
            if container is not None:
                found = search(container, snapshot)
                if found:
                    return found
        return None

    found = search(machine, None)
    if found is None:
        raise SettingsFileError(f"no snapshot {uuid} in the settings file")
    return found


def _hard_disks_attached(owner: ET.Element) -> set[str]:
    return {a.medium for a in _attachments(owner) if a.type == "HardDisk" and a.medium}


def _take_state(machine: ET.Element, snapshot: ET.Element) -> None:
    """Make the snapshot's machine state (hardware, storage, platform ...) the machine's current one."""
    tags = {_N + name for name in _STATE_ELEMENTS}
    old = [child for child in machine if child.tag in tags]
    index = list(machine).index(old[0]) if old else len(machine)
    # The copies take the indentation of the elements they replace.
    inner = old[0].tail if old else None
    last = old[-1].tail if old and old[-1] is machine[-1] else inner
    for child in old:
        machine.remove(child)
    new = [copy.deepcopy(c) for c in snapshot if c.tag in tags]
    for offset, child in enumerate(new):
        ET.indent(child, space="  ", level=2)  # Machine's children are at level 2 (VirtualBox indents by 2)
        child.tail = last if offset == len(new) - 1 else inner
        machine.insert(index + offset, child)


def freeze_instant(data: bytes, snapshot_uuid: str) -> bytes:
    """Describe the instant of a transient snapshot as the machine's current state.

    ``data`` is the settings file written right after the snapshot was
    taken; the snapshot must be the current one and have no children. The
    result is what VirtualBox would write after restoring the snapshot and
    then deleting it:

    - the snapshot is gone from the tree, and its machine state (hardware,
      storage controllers in either layout, platform ...) is the current
      one, attaching the frozen media;
    - the differencing media the snapshot created for the running machine
      are gone from the registry;
    - the NVRAM file is the snapshot's own copy (its hardware names it), so
      an EFI machine keeps the variables and the vTPM state of the instant;
    - the current snapshot is its parent (or none);
    - its saved-state file, if any, is the machine's (the machine is Saved;
      SessionMachine::restoreSnapshotHandler shares the snapshot's ``.sav``),
      else the machine has none (PoweredOff);
    - ``lastStateChange`` is the snapshot's time stamp (restoreSnapshotHandler:
      ``mLastStateChange = snapshotTimeStamp``);
    - ``currentStateModified`` is true (the attribute is dropped): deleting the
      current snapshot marks the current state modified, as it is no longer
      known to be a copy of the new current snapshot
      (Snapshot::beginSnapshotDelete, SnapshotImpl.cpp of 6.1.38 to 7.2).

    Args:
        data: The settings file.
        snapshot_uuid: The transient snapshot.

    Returns:
        The rewritten settings file.

    Raises:
        SettingsFileError: The snapshot is missing, not current, has
            children, or the in-flight media are not leaves of the registry.
    """
    prolog, root = _load(data)
    _version(root)
    machine = _machine(root)
    snapshot, holder, parent = _find_snapshot(machine, snapshot_uuid)
    if _bare(machine.get("currentSnapshot", "")) != _bare(snapshot_uuid):
        raise SettingsFileError(f"snapshot {snapshot_uuid} is not the current snapshot")
    container = snapshot.find(_N + "Snapshots")
    if container is not None and container.find(_N + "Snapshot") is not None:
        raise SettingsFileError(f"snapshot {snapshot_uuid} has child snapshots")
    if snapshot.find(_N + "Hardware") is None or machine.find(_N + "Hardware") is None:
        raise SettingsFileError("the snapshot or the machine has no Hardware element")

    in_flight = _hard_disks_attached(machine)
    _take_state(machine, snapshot)
    holder.remove(snapshot)
    if holder.tag == _N + "Snapshots" and holder.find(_N + "Snapshot") is None and parent is not None:
        parent.remove(holder)

    still_used = _hard_disks_attached(machine)
    for element in machine.iter(_N + "Snapshot"):
        still_used |= _hard_disks_attached(element)
    _drop_media(machine, in_flight - still_used)

    if parent is not None:
        machine.set("currentSnapshot", _braced(_required(parent, "uuid")))
    else:
        machine.attrib.pop("currentSnapshot", None)
    state_file = snapshot.get("stateFile")
    if state_file:
        machine.set("stateFile", state_file)
    else:
        machine.attrib.pop("stateFile", None)
    # The instant was not aborted, whatever befell the VM after it: a restored
    # snapshot is Saved or PoweredOff (SessionMachine::i_restoreSnapshotHandler,
    # SnapshotImpl.cpp), and "aborted" is only written for Aborted and
    # AbortedSaved (Machine::i_copyMachineDataToSettings, MachineImpl.cpp; 7.1.12).
    machine.attrib.pop("aborted", None)
    if snapshot.get("timeStamp"):
        machine.set("lastStateChange", snapshot.get("timeStamp", ""))
    machine.attrib.pop("currentStateModified", None)
    return _dump(prolog, root)


def _drop_media(machine: ET.Element, uuids: set[str]) -> None:
    if not uuids:
        return
    registry = machine.find(_N + "MediaRegistry")
    disks = registry.find(_N + "HardDisks") if registry is not None else None
    if disks is None:
        raise SettingsFileError("in-flight media are attached but the media registry is missing")
    found: set[str] = set()

    def prune(holder: ET.Element) -> None:
        for disk in list(holder.findall(_N + "HardDisk")):
            uuid = _bare(disk.get("uuid", ""))
            if uuid in uuids:
                if disk.find(_N + "HardDisk") is not None:
                    raise SettingsFileError(f"in-flight medium {uuid} has children in the registry")
                holder.remove(disk)
                found.add(uuid)
            else:
                prune(disk)

    prune(disks)
    missing = uuids - found
    if missing:
        raise SettingsFileError(f"attached media not in the registry: {', '.join(sorted(missing))}")


# -- relocation ---------------------------------------------------------------


def _inside(path: str) -> str:
    normal = posixpath.normpath(path)
    if normal.startswith("/") or normal == ".." or normal.startswith("../"):
        raise SettingsFileError(f"path {path!r} escapes the VM folder")
    return normal


def relocate(data: bytes, *, old_folder: str, external: Mapping[str, str] | None = None) -> bytes:
    """Make every path in a settings file valid in a new VM folder.

    Relative paths stay (after checking that they stay inside the folder);
    absolute paths inside ``old_folder`` become relative; absolute paths
    elsewhere (disks outside the VM folder) must be in ``external``, which
    maps them to paths relative to the new folder (e.g. ``_external/data.vdi``).
    Media locations, state files (machine and snapshots) and the NVRAM paths
    (machine and snapshots, in either layout) are mapped.

    The snapshot folder (``Machine/@snapshotFolder``, where VirtualBox puts
    new differencing images, saved states and NVRAM copies) is mapped the
    same way, except that a folder outside the VM folder (absolute elsewhere,
    or relative and climbing out of it) with no entry in ``external`` becomes
    ``Snapshots``, VirtualBox's default (Machine::setSnapshotFolder): the
    files that were in it are outside paths and mapped one by one like any
    other, so the relocated machine refers to nothing outside its folder.

    Args:
        data: The settings file.
        old_folder: The absolute folder the file was in.
        external: Outside paths and where they go, relative to the new folder.

    Returns:
        The rewritten settings file.

    Raises:
        SettingsFileError: A path escapes the folder, or an outside path has no mapping.
    """
    external = dict(external or {})
    old = posixpath.normpath(old_folder)
    prolog, root = _load(data)
    _version(root)
    machine = _machine(root)

    def mapped(path: str) -> str:
        if not path.startswith("/"):
            return _inside(path)
        normal = posixpath.normpath(path)
        if normal.startswith(old + "/"):
            return _inside(normal[len(old) + 1 :])
        if path in external:
            return _inside(external[path])
        raise SettingsFileError(f"{path!r} is outside the VM folder and has no mapping")

    for disk in machine.iter(_N + "HardDisk"):
        disk.set("location", mapped(_required(disk, "location")))
    for element in [machine, *machine.iter(_N + "Snapshot")]:
        if element.get("stateFile"):
            element.set("stateFile", mapped(element.get("stateFile", "")))
    for element in machine.iter(_N + "NVRAM"):
        if element.get("path"):
            element.set("path", mapped(element.get("path", "")))
    folder = machine.get("snapshotFolder")
    if folder:
        absolute = posixpath.normpath(posixpath.join(old, folder))
        if absolute == old or absolute.startswith(old + "/"):
            machine.set("snapshotFolder", posixpath.relpath(absolute, old))
        elif folder in external or absolute in external:
            machine.set("snapshotFolder", _inside(external.get(folder) or external[absolute]))
        else:
            machine.set("snapshotFolder", _DEFAULT_SNAPSHOT_FOLDER)
    return _dump(prolog, root)
