"""The .vbox settings model and its rewrites, on files shaped like VirtualBox's own."""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from attrs import frozen
from hypothesis import given, settings
from hypothesis import strategies as st

from vbremote._errors import SettingsFileError
from vbremote._settings import MAX_SETTINGS_SIZE, NS, freeze_instant, parse_settings, relocate

DATA = Path(__file__).parent / "data"
NESTED = (DATA / "nested.vbox").read_bytes()
EFI = (DATA / "efi.vbox").read_bytes()
TRANSIENT = "9a0e2b4c-7d31-4f5a-8c62-4e1d3b2a9f10"


def disk(n: int, prefix: str = "a") -> str:
    return f"{prefix}0000000-0000-4000-8000-00000000000{n}"


class TestParse:
    def test_nested_snapshots_and_media(self):
        """Machine, nested media, snapshot tree, current snapshot and attachments are read."""
        settings = parse_settings(NESTED)
        assert (settings.name, settings.uuid) == ("dev", "6f1c58a4-3b59-4d1e-9d50-1b0c9c8a7d21")
        assert settings.current_snapshot == TRANSIENT
        assert settings.state_file is None
        assert [s.name for s in settings.snapshots()] == [
            "Snapshot 1", "Snapshot 2", "vbremote-transient-2026-11-20T09.15.00",
        ]
        assert [m.uuid for m in settings.chain(disk(4))] == [disk(1), disk(2), disk(3), disk(4)]
        assert settings.medium(disk(1, "d")).location == "/srv/vm-data/data.vdi"
        hard_disks = [a.medium for a in settings.attachments if a.type == "HardDisk"]
        assert hard_disks == [disk(4), disk(4, "d")]
        dvd = [a for a in settings.attachments if a.type == "DVD"]
        assert dvd[0].medium is None  # an empty drive

    def test_efi_nvram(self):
        """An EFI machine's NVRAM file is read."""
        assert parse_settings(EFI).nvram == "efi-vm.nvram"

    @pytest.mark.parametrize(
        "data",
        [
            b'<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]>'
            b'<VirtualBox xmlns="http://www.virtualbox.org/"><Machine uuid="{x}" name="&lol2;"/></VirtualBox>',
            b'<?xml version="1.0"?>\n<!DOCTYPE v [<!ENTITY ext SYSTEM "file:///etc/passwd">]>'
            b'<VirtualBox xmlns="http://www.virtualbox.org/"><Machine uuid="{x}" name="&ext;"/></VirtualBox>',
            b"not xml at all",
            b'<VirtualBox xmlns="http://www.virtualbox.org/"><Machine',
            b'<Other xmlns="http://www.virtualbox.org/"/>',
            b'<VirtualBox xmlns="http://www.virtualbox.org/"/>',
            "<VirtualBox>\u00e9</VirtualBox>".encode("latin-1"),
        ],
        ids=["billion-laughs", "external-entity", "not-xml", "truncated", "wrong-root", "no-machine", "not-utf8"],
    )
    def test_hostile_or_malformed(self, data):
        """Entities, malformed XML and foreign documents raise SettingsFileError."""
        with pytest.raises(SettingsFileError):
            parse_settings(data)

    @pytest.mark.parametrize("version", [None, "", "linux", "1.x-linux", "1.19-"])
    def test_without_a_version(self, version):
        """A file without a valid settings version is refused (ConfigFileBase: "Cannot handle settings version")."""
        data = NESTED.replace(b' version="1.19-linux"', b"" if version is None else f' version="{version}"'.encode())
        for function in REWRITES.values():
            with pytest.raises(SettingsFileError, match="version"):
                function(data)

    @pytest.mark.parametrize("version", ["1.15-windows", "1.19-macosx", "1.22-linux", "1.7"])
    def test_versions_read(self, version):
        """Any host suffix, or none, and versions newer than 1.20 are read (1.20 and newer: Firmware/NVRAM)."""
        data = NESTED.replace(b' version="1.19-linux"', f' version="{version}"'.encode())
        assert parse_settings(data).version == version.split("-")[0]

    @pytest.mark.parametrize(
        ("kind", "depth", "refused"),
        [("snapshot", 250, None), ("snapshot", 251, "snapshot tree depth"), ("snapshot", 3000, "snapshot tree depth"),
         ("medium", 300, None), ("medium", 301, "medium tree depth"), ("medium", 5000, "medium tree depth"),
         ("extra", 560, None), ("extra", 5000, "deeper")],
    )
    def test_nesting_depth(self, kind, depth, refused):
        """Trees as deep as VirtualBox allows are read and rewritten; deeper ones are refused, not a RecursionError.

        include/VBox/settings.h: SETTINGS_SNAPSHOT_DEPTH_MAX 250, SETTINGS_MEDIUM_DEPTH_MAX 300 (7.1.12).
        """
        data = deep_settings(kind, depth)
        for function in REWRITES.values():
            if refused:
                with pytest.raises(SettingsFileError, match=refused):
                    function(data)
            else:
                function(data)

    def test_too_large(self):
        """Oversized files are refused before parsing."""
        with pytest.raises(SettingsFileError, match="bytes"):
            parse_settings(NESTED + b" " * MAX_SETTINGS_SIZE)

    def test_settings_error_is_value_error(self):
        """SettingsFileError is also a ValueError."""
        assert issubclass(SettingsFileError, ValueError)


HOSTILE = {
    "internal-entity": '<!DOCTYPE VirtualBox [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>',
    "external-entity": '<!DOCTYPE VirtualBox [<!ENTITY ext SYSTEM "file:///etc/hostname">]>',
    "parameter-entity": '<!DOCTYPE VirtualBox [<!ENTITY % p SYSTEM "http://example.invalid/p.dtd"> %p;]>',
    "external-dtd": '<!DOCTYPE VirtualBox SYSTEM "http://example.invalid/vbox.dtd">',
    "public-dtd": '<!DOCTYPE VirtualBox PUBLIC "-//X//Y" "file:///etc/hostname">',
}
NAME_REFERENCE = {"internal-entity": "&lol2;", "external-entity": "&ext;"}


def hostile(kind: str, encoding: str, *, declaration: bool) -> bytes:
    """A settings file carrying a DTD, in an encoding, with or without an XML declaration naming it."""
    name = NAME_REFERENCE.get(kind, "vm")
    declared = "UTF-16" if encoding.startswith("utf-16") else encoding.removesuffix("-sig").upper()
    prolog = f'<?xml version="1.0" encoding="{declared}"?>\n' if declaration else ""
    text = (
        prolog + HOSTILE[kind] + '\n<VirtualBox xmlns="http://www.virtualbox.org/" version="1.19-linux">'
        f'<Machine uuid="{{6f1c58a4-3b59-4d1e-9d50-1b0c9c8a7d21}}" name="{name}"/></VirtualBox>\n'
    )
    return text.encode(encoding)


def deep_settings(kind: str, depth: int) -> bytes:
    """A settings file whose snapshot tree, medium tree or extra data nests ``depth`` levels deep.

    The deepest snapshot is the current one (the one freeze_instant is asked for).
    """
    hardware = "<Hardware><StorageControllers/></Hardware>"
    machine, current = "", ""
    if kind == "snapshot":
        inner = ""
        for level in range(depth, 0, -1):
            uuid = TRANSIENT if level == depth else f"00000000-0000-4000-8000-{level:012d}"
            current = current or uuid
            children = f"<Snapshots>{inner}</Snapshots>" if inner else ""
            inner = (f'<Snapshot uuid="{{{uuid}}}" name="s{level}" timeStamp="2026-01-01T00:00:00Z">'
                     f"{hardware}{children}</Snapshot>")
        machine = inner
    elif kind == "medium":
        inner = ""
        for level in range(depth, 0, -1):
            uuid = f"d0000000-0000-4000-8000-{level:012d}"
            inner = f'<HardDisk uuid="{{{uuid}}}" location="d{level}.vdi">{inner}</HardDisk>'
        machine = f"<MediaRegistry><HardDisks>{inner}</HardDisks></MediaRegistry>"
        current = TRANSIENT
        machine += f'<Snapshot uuid="{{{TRANSIENT}}}" name="t" timeStamp="2026-01-01T00:00:00Z">{hardware}</Snapshot>'
    else:
        machine = "<ExtraData>" + "<X>" * depth + "</X>" * depth + "</ExtraData>"
        current = TRANSIENT
        machine += f'<Snapshot uuid="{{{TRANSIENT}}}" name="t" timeStamp="2026-01-01T00:00:00Z">{hardware}</Snapshot>'
    return (
        f'<VirtualBox xmlns="http://www.virtualbox.org/" version="1.19-linux"><Machine uuid="{{{TRANSIENT}}}" '
        f'name="deep" currentSnapshot="{{{current}}}">{machine}{hardware}</Machine></VirtualBox>'
    ).encode()


REWRITES = {
    "parse_settings": parse_settings,
    "freeze_instant": lambda data: freeze_instant(data, TRANSIENT),
    "relocate": lambda data: relocate(data, old_folder="/vms/dev"),
}


class TestHostileDocuments:
    @pytest.mark.parametrize("function", sorted(REWRITES))
    @pytest.mark.parametrize("kind", sorted(HOSTILE))
    @pytest.mark.parametrize(
        ("encoding", "declaration"),
        [("utf-8", False), ("utf-8", True), ("utf-8-sig", False), ("utf-16-le", False), ("utf-16-be", False),
         ("utf-16-le", True), ("utf-16", False), ("utf-16", True)],
    )
    def test_dtd_refused_before_anything_is_expanded(self, function, kind, encoding, declaration):
        """A DOCTYPE (entities, external references) is refused by the XML parser itself, in every encoding expat reads.

        UTF-16 without a byte-order mark is the case a substring test on the bytes misses.
        """
        data = hostile(kind, encoding, declaration=declaration)
        with pytest.raises(SettingsFileError, match="DOCTYPE") as raised:
            REWRITES[function](data)
        assert "lol" not in str(raised.value)

    @pytest.mark.parametrize("function", sorted(REWRITES))
    @pytest.mark.parametrize("encoding", ["utf-32", "utf-32-le", "utf-32-be"])
    @pytest.mark.parametrize("kind", sorted(HOSTILE))
    def test_utf32_refused(self, function, kind, encoding):
        """UTF-32 documents (which expat cannot read) carrying a DTD are refused with the typed error."""
        with pytest.raises(SettingsFileError):
            REWRITES[function](hostile(kind, encoding, declaration=kind == "external-dtd"))

    @pytest.mark.parametrize("declared", ["UTF-16LE", "UTF-16BE", "UTF-32", "no-such-encoding"])
    def test_declared_encoding_expat_cannot_read(self, declared):
        """A declared encoding the parser cannot read is refused with the typed error, not a bare ValueError."""
        data = (f'<?xml version="1.0" encoding="{declared}"?>\n' + HOSTILE["internal-entity"]
                + '<VirtualBox xmlns="http://www.virtualbox.org/" version="1.19-linux"/>')
        for encoding in ("utf-16-le", "utf-8"):
            with pytest.raises(SettingsFileError):
                parse_settings(data.encode(encoding))

    @pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-16"])
    def test_clean_document_not_in_utf8_refused(self, encoding):
        """VirtualBox writes UTF-8; a clean document in another encoding is refused."""
        data = NESTED.decode().replace('<?xml version="1.0"?>', "", 1).encode(encoding)
        with pytest.raises(SettingsFileError, match="not UTF-8"):
            parse_settings(data)

    def test_entity_reference_without_declaration(self):
        """An undefined entity reference is malformed, not silently dropped."""
        data = NESTED.replace(b'name="dev"', b'name="&undefined;"', 1)
        with pytest.raises(SettingsFileError, match="well-formed"):
            parse_settings(data)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=400))
    def test_arbitrary_bytes(self, data):
        """Arbitrary bytes either parse or raise SettingsFileError, nothing else."""
        with contextlib.suppress(SettingsFileError):
            parse_settings(data)

    @settings(max_examples=200, deadline=None)
    @given(cut=st.integers(min_value=0, max_value=len(NESTED)), junk=st.binary(max_size=40))
    def test_damaged_real_layout(self, cut, junk):
        """A settings file cut short or with junk spliced in parses or raises SettingsFileError, nothing else."""
        data = NESTED[:cut] + junk + NESTED[cut:]
        for function in REWRITES.values():
            with contextlib.suppress(SettingsFileError):
                function(data)


class TestFreezeInstant:
    def test_online_snapshot_in_a_tree(self):
        """The transient snapshot becomes the current state: frozen media attached, in-flight media gone, Saved."""
        frozen = parse_settings(freeze_instant(NESTED, TRANSIENT))
        assert [s.name for s in frozen.snapshots()] == ["Snapshot 1", "Snapshot 2"]
        assert frozen.current_snapshot == "52000000-0000-4000-8000-000000000002"
        assert frozen.state_file == "Snapshots/2026-11-20T09-15-00-000000000Z.sav"
        assert [a.medium for a in frozen.attachments if a.type == "HardDisk"] == [disk(3), disk(3, "d")]
        registered = {m.uuid for m in frozen.all_media()}
        assert disk(4) not in registered
        assert disk(4, "d") not in registered
        assert {disk(1), disk(2), disk(3), disk(1, "d"), disk(2, "d"), disk(3, "d")} <= registered
        # Snapshot 2 lost its only child: no empty Snapshots container remains.
        assert b"<Snapshots />" not in freeze_instant(NESTED, TRANSIENT)

    def test_everything_else_is_kept(self):
        """Unrelated settings (extra data, DVD images, the header comment, memory of the frozen hardware) are kept."""
        out = freeze_instant(NESTED, TRANSIENT)
        assert b"GUI/LastCloseAction" in out
        assert b"/isos/debian-12.iso" in out
        assert out.startswith(b'<?xml version="1.0"?>\n<!--\n** DO NOT EDIT THIS FILE.')
        assert out.count(b'RAMSize="4096"') == 1  # the current hardware is the snapshot's copy
        assert b"ns0:" not in out

    def test_offline_root_snapshot(self):
        """An offline transient root snapshot leaves no snapshot, no current snapshot and no state file."""
        frozen = parse_settings(freeze_instant(EFI, "e1000000-0000-4000-8000-0000000000aa"))
        assert frozen.snapshot is None
        assert frozen.current_snapshot is None
        assert frozen.state_file is None
        assert [a.medium for a in frozen.attachments] == ["e0000000-0000-4000-8000-000000000001"]
        assert [m.uuid for m in frozen.all_media()] == ["e0000000-0000-4000-8000-000000000001"]
        assert frozen.nvram == "efi-vm.nvram"

    def test_refusals(self):
        """Unknown, non-current, or non-leaf snapshots are refused."""
        with pytest.raises(SettingsFileError, match="no snapshot"):
            freeze_instant(NESTED, "00000000-0000-4000-8000-000000000000")
        with pytest.raises(SettingsFileError, match="not the current"):
            freeze_instant(NESTED, "52000000-0000-4000-8000-000000000002")
        not_leaf = NESTED.replace(TRANSIENT.encode(), b"9a0e2b4c-7d31-4f5a-8c62-4e1d3b2a9f1X", 1).replace(
            b'currentSnapshot="{9a0e2b4c-7d31-4f5a-8c62-4e1d3b2a9f1X}"',
            b'currentSnapshot="{52000000-0000-4000-8000-000000000002}"',
        )
        with pytest.raises(SettingsFileError, match="child"):
            freeze_instant(not_leaf, "52000000-0000-4000-8000-000000000002")


class TestRelocate:
    def test_external_disk_mapped(self):
        """Relative paths stay, an outside disk is mapped into the folder, absolute inside paths become relative."""
        data = NESTED.replace(b'location="dev.vdi"', b'location="/home/u/VirtualBox VMs/dev/dev.vdi"')
        out = parse_settings(
            relocate(data, old_folder="/home/u/VirtualBox VMs/dev",
                     external={"/srv/vm-data/data.vdi": "_external/data.vdi"})
        )
        assert out.medium(disk(1)).location == "dev.vdi"
        assert out.medium(disk(1, "d")).location == "_external/data.vdi"
        assert out.medium(disk(2)).location == f"Snapshots/{{{disk(2)}}}.vdi"

    def test_unmapped_outside_path(self):
        """An outside path without a mapping is refused."""
        with pytest.raises(SettingsFileError, match="no mapping"):
            relocate(NESTED, old_folder="/home/u/VirtualBox VMs/dev")

    @pytest.mark.parametrize("path", ["../escape.vdi", "Snapshots/../../escape.vdi"])
    def test_escaping_paths(self, path):
        """Paths that climb out of the VM folder are refused."""
        data = NESTED.replace(b'location="dev.vdi"', f'location="{path}"'.encode())
        with pytest.raises(SettingsFileError, match="escapes"):
            relocate(data, old_folder="/vms/dev", external={"/srv/vm-data/data.vdi": "_external/data.vdi"})

    def test_state_and_nvram_paths(self):
        """State files and the NVRAM path are mapped too."""
        data = EFI.replace(b'path="efi-vm.nvram"', b'path="/vms/efi/efi-vm.nvram"')
        out = parse_settings(relocate(data, old_folder="/vms/efi"))
        assert out.nvram == "efi-vm.nvram"


# -- every layout VirtualBox 6.1 to 7.2 writes ------------------------------------------------------------------------

S1, S2 = "51000000-0000-4000-8000-000000000001", "52000000-0000-4000-8000-000000000002"
SNAPSHOT_NVRAM = {
    S1: "Snapshots/2026-10-01T08-00-00-111111111Z.nvram",
    S2: "Snapshots/2026-11-01T08-00-00-123456789Z.nvram",
    TRANSIENT: "Snapshots/2026-11-20T09-15-00-987654321Z.nvram",
}
TRANSIENT_SAV = "Snapshots/2026-11-20T09-15-00-987654321Z.sav"
OLD_FOLDER = "/home/u/VirtualBox VMs/dev"
EXTERNAL = {"/srv/vm-data/data.vdi": "_external/data.vdi"}


@frozen
class Layout:
    """A settings fixture and what it holds (see tests/data/README.md for the real files each follows)."""

    file: str
    version: str
    storage_beside_hardware: bool
    efi: bool
    online: bool

    @property
    def data(self) -> bytes:
        return (DATA / self.file).read_bytes()


LAYOUTS = [
    Layout("v1.15-sibling-bios.vbox", "1.15", storage_beside_hardware=True, efi=False, online=False),
    Layout("v1.16-sibling-bios.vbox", "1.16", storage_beside_hardware=True, efi=False, online=True),
    Layout("v1.17-sibling-bios.vbox", "1.17", storage_beside_hardware=True, efi=False, online=True),
    Layout("v1.17-hardware-bios.vbox", "1.17", storage_beside_hardware=False, efi=False, online=False),
    Layout("v1.18-efi.vbox", "1.18", storage_beside_hardware=False, efi=True, online=True),
    Layout("v1.19-efi.vbox", "1.19", storage_beside_hardware=False, efi=True, online=True),
    Layout("v1.20-efi.vbox", "1.20", storage_beside_hardware=False, efi=True, online=False),
]
layouts = pytest.mark.parametrize("layout", LAYOUTS, ids=[layout.file for layout in LAYOUTS])


def hard_disks(attachments) -> list[str | None]:
    return [a.medium for a in attachments if a.type == "HardDisk"]


def machine_children(data: bytes) -> list[str]:
    machine = ET.fromstring(data).find(f"{{{NS}}}Machine")
    assert machine is not None
    return [child.tag.removeprefix(f"{{{NS}}}") for child in machine if isinstance(child.tag, str)]


class TestLayouts:
    """Settings files of versions 1.15 to 1.20 in every layout (Settings.cpp, 6.1.38 to 7.2).

    StorageControllers sits beside Hardware before 1.17 and in 1.17 files of VirtualBox 6.0
    (MachineConfigFile::buildHardwareXML picks the parent with ``m->sv >= SettingsVersion_v1_17``;
    readMachine and readSnapshot read it there in every version); NVRAM is Hardware/BIOS/NVRAM up to
    1.19 and Hardware/Firmware/NVRAM from 1.20, with Platform beside Hardware (buildPlatformXML).
    """

    @layouts
    def test_parse(self, layout):
        """Machine and every snapshot: attachments, NVRAM copies, saved states and the version are read."""
        settings = parse_settings(layout.data)
        assert settings.version == layout.version
        assert hard_disks(settings.attachments) == [disk(4), disk(4, "d")]
        nodes = list(settings.snapshots())
        assert [n.uuid for n in nodes] == [S1, S2, TRANSIENT]
        assert [hard_disks(n.attachments) for n in nodes] == [[disk(i), disk(i, "d")] for i in (1, 2, 3)]
        assert nodes[2].state_file == (TRANSIENT_SAV if layout.online else None)
        if layout.efi:
            assert settings.nvram == "dev.nvram"
            assert [n.nvram for n in nodes] == [SNAPSHOT_NVRAM[n.uuid] for n in nodes]
        else:
            assert settings.nvram is None
            assert [n.nvram for n in nodes] == [None, None, None]
        assert settings.current_state_modified is layout.online

    @layouts
    def test_freeze_instant(self, layout):
        """The transient snapshot's state becomes current: frozen media, its NVRAM and .sav; in-flight media gone."""
        out = freeze_instant(layout.data, TRANSIENT)
        frozen = parse_settings(out)
        assert [s.uuid for s in frozen.snapshots()] == [S1, S2]
        assert frozen.current_snapshot == S2
        assert hard_disks(frozen.attachments) == [disk(3), disk(3, "d")]
        registered = {m.uuid for m in frozen.all_media()}
        assert registered == {disk(i, p) for i in (1, 2, 3) for p in "ad"}
        assert frozen.state_file == (TRANSIENT_SAV if layout.online else None)
        assert frozen.nvram == (SNAPSHOT_NVRAM[TRANSIENT] if layout.efi else None)
        assert frozen.current_state_modified is True
        assert b'lastStateChange="2026-11-20T09:15:00Z"' in out

    @layouts
    def test_freeze_instant_keeps_the_layout(self, layout):
        """The frozen file keeps the version's layout: one Hardware, storage where it was, one Platform on 1.20."""
        before, after = machine_children(layout.data), machine_children(freeze_instant(layout.data, TRANSIENT))
        assert after.count("Hardware") == 1
        assert after.count("StorageControllers") == (1 if layout.storage_beside_hardware else 0)
        assert after.count("Platform") == (1 if layout.version == "1.20" else 0)
        assert [t for t in after if t not in ("Snapshot",)] == [t for t in before if t not in ("Snapshot",)]
        root = ET.fromstring(freeze_instant(layout.data, TRANSIENT))
        n = f"{{{NS}}}"
        firmware = "Firmware" if layout.version == "1.20" else "BIOS"
        nvram = root.findall(f"{n}Machine/{n}Hardware/{n}{firmware}/{n}NVRAM")
        assert [e.get("path") for e in nvram] == ([SNAPSHOT_NVRAM[TRANSIENT]] if layout.efi else [])

    @layouts
    def test_frozen_state_is_the_snapshots(self, layout):
        """Hardware, platform and recording settings changed after the snapshot are replaced by the snapshot's."""
        root = ET.fromstring(layout.data)
        n = f"{{{NS}}}"
        machine = root.find(f"{n}Machine")
        assert machine is not None
        changed = [machine.find(f"{n}Hardware/{n}Memory"), machine.find(f"{n}Platform/{n}Chipset"),
                   machine.find(f"{n}VideoCapture")]
        for element in changed:
            if element is not None:
                element.set("changed-after-the-snapshot", "yes")
        assert b"changed-after-the-snapshot" in ET.tostring(root)
        out = freeze_instant(ET.tostring(root), TRANSIENT)
        assert b"changed-after-the-snapshot" not in out

    @layouts
    def test_relocate(self, layout):
        """Absolute paths inside the folder become relative, the outside disk is mapped, snapshot NVRAM copies too."""
        data = layout.data.replace(b'path="Snapshots/', f'path="{OLD_FOLDER}/Snapshots/'.encode())
        data = data.replace(b'location="dev.vdi"', f'location="{OLD_FOLDER}/dev.vdi"'.encode())
        out = parse_settings(relocate(data, old_folder=OLD_FOLDER, external=EXTERNAL))
        assert out.medium(disk(1)).location == "dev.vdi"
        assert out.medium(disk(1, "d")).location == "_external/data.vdi"
        if layout.efi:
            assert [n.nvram for n in out.snapshots()] == [SNAPSHOT_NVRAM[u] for u in (S1, S2, TRANSIENT)]
        assert hard_disks(out.attachments) == [disk(4), disk(4, "d")]

    @layouts
    def test_freeze_then_relocate(self, layout):
        """The archived file (frozen, then relocated) describes the instant with nothing outside the folder."""
        out = parse_settings(relocate(freeze_instant(layout.data, TRANSIENT), old_folder=OLD_FOLDER,
                                      external=EXTERNAL))
        assert hard_disks(out.attachments) == [disk(3), disk(3, "d")]
        assert out.medium(disk(1, "d")).location == "_external/data.vdi"
        assert all(not m.location.startswith("/") for m in out.all_media())
        assert out.nvram == (SNAPSHOT_NVRAM[TRANSIENT] if layout.efi else None)

    def test_storage_beside_hardware_in_a_117_file(self):
        """A 1.17 file of VirtualBox 6.0 (storage beside Hardware) is read by its layout, not by its version."""
        for name in ("v1.17-sibling-bios.vbox", "v1.17-hardware-bios.vbox"):
            data = (DATA / name).read_bytes()
            assert [hard_disks(n.attachments) for n in parse_settings(data).snapshots()] == [
                [disk(i), disk(i, "d")] for i in (1, 2, 3)
            ]

    @pytest.mark.parametrize(
        ("file", "wrong"),
        [("v1.19-efi.vbox", (b"<BIOS>", b"</BIOS>", b"<Firmware>", b"</Firmware>")),
         ("v1.20-efi.vbox", (b'<Firmware type="EFI">', b"</Firmware>", b'<Firmware type="EFI"/><BIOS>', b"</BIOS>"))],
    )
    def test_nvram_only_where_the_version_puts_it(self, file, wrong):
        """readHardware reads NVRAM from BIOS before 1.20 and from Firmware from 1.20 on; the other place is ignored."""
        old_open, old_close, new_open, new_close = wrong
        data = (DATA / file).read_bytes().replace(old_open, new_open).replace(old_close, new_close)
        settings = parse_settings(data)
        assert settings.nvram is None
        assert [n.nvram for n in settings.snapshots()] == [None, None, None]

    @settings(max_examples=60, deadline=None)
    @given(data=st.data())
    def test_storage_placement_does_not_change_the_result(self, data):
        """Whichever owner keeps its controllers beside Hardware (mixed too), parse and freeze read the same disks."""
        layout = data.draw(st.sampled_from(LAYOUTS))
        root = ET.fromstring(layout.data)
        n = f"{{{NS}}}"
        owners = [root.find(f"{n}Machine"), *root.iter(f"{n}Snapshot")]
        for owner in owners:
            assert owner is not None
            beside = data.draw(st.booleans())
            controllers = owner.find(f"{n}StorageControllers")
            hardware = owner.find(f"{n}Hardware")
            assert hardware is not None
            if controllers is None:
                controllers = hardware.find(f"{n}StorageControllers")
                assert controllers is not None
                hardware.remove(controllers)
            else:
                owner.remove(controllers)
            target = owner if beside else hardware
            target.insert(list(target).index(hardware) + 1 if beside else len(target), controllers)
        moved = ET.tostring(root)
        assert [hard_disks(s.attachments) for s in parse_settings(moved).snapshots()] == [
            [disk(i), disk(i, "d")] for i in (1, 2, 3)
        ]
        frozen = parse_settings(freeze_instant(moved, TRANSIENT))
        assert hard_disks(frozen.attachments) == [disk(3), disk(3, "d")]
        assert disk(4) not in {m.uuid for m in frozen.all_media()}


class TestSnapshotFolder:
    """relocate maps Machine/@snapshotFolder; outside folders become VirtualBox's default, Snapshots."""

    @pytest.mark.parametrize(
        ("folder", "external", "expected"),
        [
            ("Snapshots", {}, "Snapshots"),
            ("./snaps/../Snapshots", {}, "Snapshots"),
            (f"{OLD_FOLDER}/Snapshots", {}, "Snapshots"),
            ("/var/vbox-snapshots/dev", {}, "Snapshots"),
            ("../shared-snapshots", {}, "Snapshots"),
            ("/var/vbox-snapshots/dev", {"/var/vbox-snapshots/dev": "_external/snapshots"}, "_external/snapshots"),
        ],
        ids=["relative", "relative-normalised", "absolute-inside", "absolute-outside", "escaping", "mapped"],
    )
    def test_mapped(self, folder, external, expected):
        """The snapshot folder ends inside the new folder: relative, mapped, or the default for an outside one."""
        data = NESTED.replace(b'snapshotFolder="Snapshots"', f'snapshotFolder="{folder}"'.encode())
        out = parse_settings(relocate(data, old_folder=OLD_FOLDER, external={**EXTERNAL, **external}))
        assert out.snapshot_folder == expected

    def test_mapping_that_escapes_is_refused(self):
        """A mapping of the snapshot folder that climbs out of the new folder is refused."""
        data = NESTED.replace(b'snapshotFolder="Snapshots"', b'snapshotFolder="/var/snaps"')
        with pytest.raises(SettingsFileError, match="escapes"):
            relocate(data, old_folder=OLD_FOLDER, external={**EXTERNAL, "/var/snaps": "../snaps"})
