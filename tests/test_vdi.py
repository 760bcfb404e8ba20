"""The simulator's VDI images: a flat model predicts every read; qemu-img reads the base images."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vbremote
from vbremote._diskformats import disk_chunking
from vbremote.testing._vdi import VDI, VDI_BLOCK_SIZE

MIB = VDI_BLOCK_SIZE
SIZE = 4 * MIB

qemu = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed (qemu-utils)")


def raw_from_qemu(path: Path, tmp: Path) -> bytes:
    out = tmp / "raw.img"
    subprocess.run(["qemu-img", "convert", "-f", "vdi", "-O", "raw", str(path), str(out)], check=True)
    return out.read_bytes()


class TestLayout:
    def test_virtualbox_alignment(self, tmp_path):
        """The data area starts at a 1 MiB boundary, so vbremote's plain 1 MiB chunks line up."""
        image = VDI.create(tmp_path / "d.vdi", 64 * MIB)
        assert image.header.offset_data % MIB == 0
        assert disk_chunking(tmp_path / "d.vdi", MIB) == vbremote.Chunking.fixed(MIB)

    def test_reopen(self, tmp_path):
        """An image reopens with its content, uuid and block map."""
        image = VDI.create(tmp_path / "d.vdi", SIZE)
        image.write(MIB + 5, b"hello")
        again = VDI.open(tmp_path / "d.vdi")
        assert again.uuid == image.uuid
        assert again.read(MIB, 10) == b"\0" * 5 + b"hello"

    def test_diff_needs_its_parent(self, tmp_path):
        """A differencing image opens only with its own parent."""
        base = VDI.create(tmp_path / "base.vdi", SIZE)
        VDI.create_diff(tmp_path / "child.vdi", base)
        other = VDI.create(tmp_path / "other.vdi", SIZE)
        with pytest.raises(vbremote.ConfigurationError):
            VDI.open(tmp_path / "child.vdi")
        with pytest.raises(vbremote.ConfigurationError):
            VDI.open(tmp_path / "child.vdi", parent=other)
        assert VDI.open(tmp_path / "child.vdi", parent=base).is_diff

    def test_bad_input(self, tmp_path):
        """Odd sizes, out-of-range writes and non-VDI files are refused."""
        with pytest.raises(vbremote.ConfigurationError):
            VDI.create(tmp_path / "a.vdi", MIB + 1)
        image = VDI.create(tmp_path / "b.vdi", SIZE)
        with pytest.raises(vbremote.ConfigurationError):
            image.write(SIZE - 1, b"xx")
        (tmp_path / "c.vdi").write_bytes(b"x" * 1024)
        with pytest.raises(vbremote.ConfigurationError):
            VDI.open(tmp_path / "c.vdi")

    @qemu
    def test_qemu_reads_base(self, tmp_path):
        """qemu-img checks the image and sees the guest's data."""
        image = VDI.create(tmp_path / "d.vdi", SIZE)
        image.write(2 * MIB + 100, b"guest data")
        subprocess.run(["qemu-img", "check", "-f", "vdi", str(tmp_path / "d.vdi")], check=True, capture_output=True)
        assert raw_from_qemu(tmp_path / "d.vdi", tmp_path) == image.read(0, SIZE)


writes = st.tuples(st.integers(0, SIZE - 1), st.integers(1, MIB + MIB // 2), st.integers(0, 255))
operations = st.lists(
    st.one_of(
        writes.map(lambda w: ("write", w)),
        st.just(("snapshot", None)),
        st.just(("merge", None)),
        st.just(("restore", None)),
    ),
    max_size=25,
)


@qemu
@settings(max_examples=40, deadline=None)
@given(operations)
def test_any_history_matches_a_flat_model(ops):
    """Any sequence of guest writes, snapshots, merges and restores reads as a flat model predicts."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        chain = [VDI.create(tmp / "base.vdi", SIZE)]
        model = bytearray(SIZE)
        frozen: list[bytes] = []  # the content each snapshot froze
        counter = 0
        for op, arg in ops:
            top = chain[-1]
            if op == "write":
                offset, length, value = arg
                length = min(length, SIZE - offset)
                data = bytes([value]) * length
                top.write(offset, data)
                model[offset : offset + length] = data
            elif op == "snapshot":
                counter += 1
                chain.append(VDI.create_diff(tmp / f"diff{counter}.vdi", top))
                frozen.append(bytes(model))
            elif op == "merge" and len(chain) > 1:
                parent = top.merge_into_parent()
                top.path.unlink()
                chain.pop()
                assert parent is chain[-1]
                frozen.pop()
            elif op == "restore" and len(chain) > 1:
                top.path.unlink()
                chain.pop()
                counter += 1
                chain.append(VDI.create_diff(tmp / f"diff{counter}.vdi", chain[-1]))
                model[:] = frozen[-1]
            assert chain[-1].read(0, SIZE) == bytes(model)
        # Merge everything down: the base alone holds the content, and qemu-img agrees.
        while len(chain) > 1:
            chain.pop().merge_into_parent()
        assert chain[0].read(0, SIZE) == bytes(model)
        assert raw_from_qemu(tmp / "base.vdi", tmp) == bytes(model)


@pytest.mark.qemu
class TestGuestWrite:
    def test_writes_into_a_folder_with_spaces(self, tmp_path: Path) -> None:
        """guest_write works where VirtualBox keeps VMs ("VirtualBox VMs/my vm"), though qemu-io splits at spaces."""
        if not vbremote.testing.qemu_tools_available():
            pytest.skip("qemu-img/qemu-io are not installed (Debian package qemu-utils)")
        folder = tmp_path / "VirtualBox VMs" / "my vm"
        folder.mkdir(parents=True)
        image = folder / "disk one.vdi"
        vbremote.testing.make_vdi(image, 4 * vbremote.testing.MIB, seed=1)
        vbremote.testing.guest_write(image, vbremote.testing.MIB, b"x" * 65536)
        raw = tmp_path / "raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
        data = raw.read_bytes()
        assert data[vbremote.testing.MIB : vbremote.testing.MIB + 65536] == b"x" * 65536
        assert sorted(p.name for p in folder.iterdir()) == ["disk one.vdi"]
