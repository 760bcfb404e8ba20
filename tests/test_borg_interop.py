"""Interoperability with the real borg command-line tool (the peer users have)."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PASSPHRASE, disk_content, metadata, vm_specs

import vbremote
from vbremote.testing import MIB

pytestmark = pytest.mark.borgcli


class TestBorgReadsOurArchives:
    def test_list_check_extract(self, repo, transport, vm_folder, borg_cli, tmp_path):
        """borg lists, checks with --verify-data, and extracts our archive byte for byte."""
        repo.write_archive("dev-1", vm_specs(vm_folder), metadata("dev"))
        repo.close()
        listing = json.loads(borg_cli("list", "--json", transport.path))
        assert [a["name"] for a in listing["archives"]] == ["dev-1"]
        borg_cli("check", "--verify-data", transport.path)
        target = tmp_path / "extracted"
        target.mkdir()
        borg_cli("extract", f"{transport.path}::dev-1", cwd=target)
        for name in ("vm.vbox", "vm.vdi", "vm.nvram"):
            assert (target / name).read_bytes() == (vm_folder / name).read_bytes()

    def test_metadata_is_the_archive_comment(self, repo, transport, vm_folder, borg_cli):
        """borg info shows vbremote's metadata as the archive comment (plain JSON)."""
        meta = metadata("dev")
        repo.write_archive("dev-1", vm_specs(vm_folder), meta)
        repo.close()
        info = json.loads(borg_cli("info", "--json", f"{transport.path}::dev-1"))
        comment = json.loads(info["archives"][0]["comment"])
        assert comment["vm"] == {"name": "dev", "uuid": meta.vm_uuid}
        assert {f["path"] for f in comment["files"]} == {"vm.vbox", "vm.vdi", "vm.nvram"}

    @pytest.mark.parametrize("compression", ["lz4", "zstd,3", "none"])
    def test_blocks_compressed_as_borg_compresses_them(self, tmp_path, base_dir, borg_cli, compression):
        """Blocks are stored as borg create -C stores them (compressed only when smaller), and borg extracts them."""
        rng = random.Random(7)
        text = b"".join(b"block %d of a guest's text file\n" % i for i in range(40000))[:MIB]
        image = tmp_path / "disk.img"
        # Compressible, incompressible, zero, half of each, and a short tail.
        image.write_bytes(text + rng.randbytes(MIB) + bytes(MIB) + rng.randbytes(MIB // 2) + bytes(MIB // 2)
                          + rng.randbytes(12345))
        ours = vbremote.LocalTransport(tmp_path / "ours")
        with vbremote.Repository.init(ours, passphrase=PASSPHRASE, base_dir=base_dir, compression=compression) as repo:
            repo.write_archive("a", [vbremote.FileSpec(image, "disk.img", vbremote.FileRole.DISK)], metadata())
        theirs = tmp_path / "theirs"
        borg_cli("init", "--encryption=repokey", str(theirs))
        borg_cli("create", "-C", compression, "--chunker-params", f"fixed,{MIB}", f"{theirs}::b", "disk.img",
                 cwd=tmp_path)

        def compressed_size(archive: str) -> int:
            return int(borg_cli("list", "--format", "{csize}", archive, "disk.img"))

        assert compressed_size(f"{ours.path}::a") == compressed_size(f"{theirs}::b")
        borg_cli("check", "--verify-data", str(ours.path))
        target = tmp_path / "out"
        target.mkdir()
        borg_cli("extract", f"{ours.path}::a", cwd=target)
        assert (target / "disk.img").read_bytes() == image.read_bytes()

    def test_borg_records_our_chunker(self, repo, transport, tmp_path, borg_cli):
        """borg info reports the fixed chunker parameters vbremote used."""
        spec = tmp_path / "d.img"
        spec.write_bytes(disk_content(2))
        repo.write_archive("a", [vbremote.FileSpec(spec, "d.img", vbremote.FileRole.DISK)], metadata())
        repo.close()
        info = json.loads(borg_cli("info", "--json", f"{transport.path}::a"))
        assert info["archives"][0]["chunker_params"][:2] == ["fixed", MIB]

    def test_borg_writes_after_us(self, repo, transport, tmp_path, borg_cli, base_dir):
        """borg create and delete on our repository keep our archives and our settings intact."""
        spec = tmp_path / "d.img"
        spec.write_bytes(disk_content(2))
        repo.write_archive("ours", [vbremote.FileSpec(spec, "d.img", vbremote.FileRole.DISK)], metadata())
        repo.close()
        borg_cli("create", f"{transport.path}::theirs", "d.img", cwd=tmp_path)
        borg_cli("delete", f"{transport.path}::theirs")
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir) as again:
            assert [a.name for a in again.archives()] == ["ours"]
            assert again.check(verify_data=True).ok


class TestPerFileCompression:
    def test_borg_sees_each_files_compression_and_extracts_it(self, tmp_path, base_dir, borg_cli):
        """A saved state is stored with its own compression (borg object header) and finer chunks; borg extracts it."""
        transport = vbremote.LocalTransport(tmp_path / "plain")
        state = tmp_path / "vm.sav"
        state.write_bytes(b"".join(b"page %d of guest memory\n" % i for i in range(120_000)))
        other = tmp_path / "notes.txt"
        other.write_bytes(b"".join(b"line %d of a log\n" % i for i in range(120_000)))
        specs = [
            vbremote.FileSpec(state, "vm.sav", vbremote.FileRole.STATE, compression="zstd,1"),
            vbremote.FileSpec(other, "notes.txt", vbremote.FileRole.OTHER),
        ]
        # Unencrypted, so that the stored objects show borg's compression header.
        with vbremote.Repository.init(transport, encryption="none", base_dir=base_dir) as repo:
            written = repo.write_archive("a", specs, metadata())
            chunks = {path: repo.chunk_list("a", path).chunks for path in ("vm.sav", "notes.txt")}
        ids = {path: [c.id for c in listed] for path, listed in chunks.items()}
        # The saved state is cut finer than borg's default: chunks of at most 1 MiB.
        assert written.archive.file("vm.sav").chunking == vbremote.Chunking.saved_state()
        assert len(chunks["vm.sav"]) >= 3
        assert max(c.size for c in chunks["vm.sav"]) <= MIB
        headers: dict[str, set[bytes]] = {}
        for path, chunk_ids in ids.items():
            for n, chunk_id in enumerate(chunk_ids):
                out = tmp_path / f"{path}.{n}.obj"
                borg_cli("debug", "get-obj", transport.path, chunk_id.hex(), str(out))
                # The plaintext key's type byte, then borg's compressor id: 03 00 zstd, 01 00 lz4.
                headers.setdefault(path, set()).add(out.read_bytes()[:3])
        assert headers == {"vm.sav": {b"\x02\x03\x00"}, "notes.txt": {b"\x02\x01\x00"}}
        target = tmp_path / "extracted"
        target.mkdir()
        borg_cli("extract", f"{transport.path}::a", cwd=target)
        assert (target / "vm.sav").read_bytes() == state.read_bytes()
        assert (target / "notes.txt").read_bytes() == other.read_bytes()


class TestWeReadBorgArchives:
    @pytest.mark.parametrize("encryption", vbremote.ENCRYPTION_MODES)
    def test_borg_fixed_chunks_equal_local_ids(self, tmp_path, base_dir, borg_cli, encryption):
        """A 'borg create --chunker-params fixed,4194304' archive has the chunk ids vbremote computes locally."""
        repo_path = tmp_path / "r"
        borg_cli("init", f"--encryption={encryption}", str(repo_path))
        image = tmp_path / "disk.img"
        image.write_bytes(disk_content(9, seed=5) + os.urandom(12345))
        borg_cli(
            "create", "-C", "lz4", "--chunker-params", "fixed,4194304", f"{repo_path}::cli", "disk.img",
            cwd=tmp_path,
        )
        with vbremote.Repository.open(
            vbremote.LocalTransport(repo_path), passphrase=PASSPHRASE, base_dir=base_dir
        ) as repo:
            stored = repo.chunk_list("cli", "disk.img")
            local = repo.local_chunk_ids(image, chunking=vbremote.Chunking.fixed(4 * MIB))
            assert local == [c.id for c in stored.chunks]
            data = b"".join(d for _, d in repo.fetch_chunks(c.id for c in stored.chunks))
            assert data == image.read_bytes()

    def test_borg_header_chunker_equals_ours(self, repo, transport, vm_folder, borg_cli, tmp_path):
        """borg's own 'fixed,BLOCK,HEADER' chunking of a VDI gives the ids of vbremote's header-aware chunking."""
        written = repo.write_archive("ours", vm_specs(vm_folder), metadata())
        chunking = written.archive.file("vm.vdi").chunking
        assert chunking.header_size > 0
        ours = [c.id for c in repo.chunk_list("ours", "vm.vdi").chunks]
        repo.close()
        borg_cli(
            "create", "--chunker-params", chunking.borg_params(), f"{transport.path}::cli", "vm.vdi",
            cwd=vm_folder,
        )
        with vbremote.Repository.open(
            transport, passphrase=PASSPHRASE, base_dir=borg_cli.base_dir
        ) as again:
            assert [c.id for c in again.chunk_list("cli", "vm.vdi").chunks] == ours


def test_restored_folder_matches(tmp_path: Path, vm_folder: Path, repo, transport, borg_cli) -> None:
    """Disaster recovery without vbremote: borg extract gives back the whole VM folder."""
    repo.write_archive("vm-1", vm_specs(vm_folder), metadata())
    repo.close()
    out = tmp_path / "out"
    out.mkdir()
    borg_cli("extract", f"{transport.path}::vm-1", cwd=out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in vm_folder.iterdir())


class TestBlockAccessOnBorgArchives:
    @pytest.mark.parametrize("encryption", vbremote.ENCRYPTION_MODES)
    def test_ids_here_equal_borgs_for_any_chunker(self, tmp_path, base_dir, borg_cli, encryption):
        """For every mode, ids hashed here at the archive's own boundaries (fixed or buzhash) equal borg's."""
        repo_path = tmp_path / "r"
        borg_cli("init", f"--encryption={encryption}", str(repo_path))
        image = tmp_path / "disk.img"
        image.write_bytes(disk_content(12, seed=8) + bytes(4 * MIB) + os.urandom(777))
        borg_cli("create", "--chunker-params", "fixed,4194304", f"{repo_path}::fixed", "disk.img", cwd=tmp_path)
        borg_cli("create", "--chunker-params", "buzhash,16,20,18,4095", f"{repo_path}::cdc", "disk.img",
                 cwd=tmp_path)
        with vbremote.Repository.open(
            vbremote.LocalTransport(repo_path), passphrase=PASSPHRASE, base_dir=base_dir
        ) as repo:
            fixed = repo.chunk_lists("fixed").file("disk.img")
            ids = [c.id for c in fixed.chunks]
            assert repo.local_ids(image, fixed.chunks) == ids
            assert ids[3] == repo.zero_chunk_id(4 * MIB)  # the appended zero block
            cdc = repo.chunk_lists("cdc").file("disk.img")
            sizes = {c.size for c in cdc.chunks}
            assert len(sizes) > 2  # content-defined: boundaries follow the data
            assert repo.local_ids(image, cdc.chunks) == [c.id for c in cdc.chunks]
            assert cdc.size == fixed.size == image.stat().st_size

    def test_folder_archive_items_and_kinds(self, tmp_path, base_dir, borg_cli):
        """A 'borg create' of a folder reports every regular file, and symlinks, hard links, FIFOs by kind."""
        repo_path = tmp_path / "r"
        borg_cli("init", "--encryption=repokey", str(repo_path))
        folder = tmp_path / "vm"
        (folder / "sub").mkdir(parents=True)
        (folder / "a.bin").write_bytes(disk_content(3, seed=1))
        (folder / "empty").write_bytes(b"")
        (folder / "sub" / "b.txt").write_text("hello\n")
        os.link(folder / "sub" / "b.txt", folder / "b-link")
        (folder / "sym").symlink_to("sub/b.txt")
        os.mkfifo(folder / "fifo")
        borg_cli("create", f"{repo_path}::folder", "vm", cwd=tmp_path)
        with vbremote.Repository.open(
            vbremote.LocalTransport(repo_path), passphrase=PASSPHRASE, base_dir=base_dir
        ) as repo:
            contents = repo.chunk_lists("folder")
            kinds = {item.path: item.kind for item in contents.items}
            k = vbremote.ItemKind
            assert kinds == {
                "vm": k.DIRECTORY, "vm/sub": k.DIRECTORY, "vm/a.bin": k.FILE, "vm/empty": k.FILE,
                "vm/sub/b.txt": k.FILE, "vm/b-link": k.FILE, "vm/sym": k.SYMLINK, "vm/fifo": k.FIFO,
            }
            files = contents.files()
            # borg stores a hard link's content once; the other name points at it.
            linked = {item.path for item in contents.items if item.hardlinked}
            assert linked == {"vm/sub/b.txt", "vm/b-link"}
            holder, other = sorted(linked, key=lambda p: p in files)[::-1]
            assert holder in files
            assert other not in files
            assert next(i for i in contents.items if i.path == other).link_target == holder
            assert {i.path for i in contents.items if i.is_plain_file} == {"vm/a.bin", "vm/empty"}
            assert next(i for i in contents.items if i.path == "vm/sym").link_target == "sub/b.txt"
            assert files["vm/empty"].chunks == ()
            for path in ("vm/a.bin", holder):
                data = b"".join(d for _, d in repo.fetch_chunks(c.id for c in files[path].chunks))
                assert data == (tmp_path / path).read_bytes()

    def test_hostile_archive_is_refused(self, tmp_path, base_dir, borg_cli):
        """An archive whose item escapes the folder (written with borg's own code) raises ArchiveInvalid."""
        repo_path = tmp_path / "r"
        borg_cli("init", "--encryption=repokey", str(repo_path))
        forge = (
            "import sys, stat\n"
            "import borg.logger\n"
            "borg.logger.setup_logging()\n"
            "from borg.repository import Repository\n"
            "from borg.helpers import Manifest\n"
            "from borg.cache import Cache\n"
            "from borg.archive import Archive\n"
            "from borg.item import Item\n"
            "with Repository(sys.argv[1], exclusive=True) as repository:\n"
            "    manifest, key = Manifest.load(repository, Manifest.NO_OPERATION_CHECK)\n"
            "    with Cache(repository, key, manifest) as cache:\n"
            "        archive = Archive(repository, key, manifest, 'evil', cache=cache, create=True)\n"
            "        archive.add_item(Item(path='../../etc/cron.d/x', mode=stat.S_IFREG | 0o644,\n"
            "                              uid=0, gid=0, mtime=0, chunks=[]), show_progress=False)\n"
            "        archive.save()\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", forge, str(repo_path)], env=borg_cli.env(), capture_output=True, text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        with vbremote.Repository.open(
            vbremote.LocalTransport(repo_path), passphrase=PASSPHRASE, base_dir=base_dir
        ) as repo:
            with pytest.raises(vbremote.ArchiveInvalid, match="leaves the folder") as caught:
                repo.chunk_lists("evil")
            assert caught.value.archive == "evil"
            assert caught.value.path == "../../etc/cron.d/x"


# Every stored object's AES-CTR counter range (envelope: type, 32-byte MAC, 8-byte IV, ciphertext).
COUNTER_RANGES = (
    "import sys\n"
    "import borg.logger\n"
    "borg.logger.setup_logging()\n"
    "from borg.repository import Repository\n"
    "with Repository(sys.argv[1], exclusive=True) as repository:\n"
    "    for object_id in repository.list(limit=1000000):\n"
    "        data = repository.get(object_id)\n"
    "        first = int.from_bytes(data[33:41], 'big')\n"
    "        print(first, first + (len(data) - 41 + 15) // 16)\n"
)


class TestNonces:
    def test_reads_between_writes_never_reuse_a_counter(self, tmp_path, base_dir, borg_cli):
        """Listing, chunk lists, fetches and a cancelled write between writes leave no two objects sharing keystream."""
        transport = vbremote.LocalTransport(tmp_path / "r")
        rng = random.Random(7)

        def disk(name: str, mib: int) -> vbremote.FileSpec:
            path = tmp_path / name
            path.write_bytes(rng.randbytes(mib * MIB))
            return vbremote.FileSpec(path, name, vbremote.FileRole.DISK)

        class Stop(Exception):
            pass

        def stop(event: vbremote.Progress) -> None:
            if event.done > 0:
                raise Stop

        vbremote.Repository.init(transport, passphrase=PASSPHRASE, base_dir=base_dir).close()
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir) as repo:
            repo.write_archive("a", [disk("a.vdi", 2)], metadata(), checkpoint_interval=None)
            listed = repo.chunk_lists("a").files()["a.vdi"].chunks
            with repo.fetch([c.id for c in listed]) as stream:
                assert sum(len(chunk.data) for chunk in stream) == 2 * MIB
            repo.write_archive("b", [disk("b.vdi", 2)], metadata(), checkpoint_interval=None)
            assert [a.name for a in repo.archives()] == ["a", "b"]
            with pytest.raises(Stop):
                repo.write_archive("cancelled", [disk("x.vdi", 4)], metadata(), checkpoint_interval=None,
                                   progress=stop)
            repo.write_archive("c", [disk("c.vdi", 2)], metadata(), checkpoint_interval=None)
        result = subprocess.run([sys.executable, "-c", COUNTER_RANGES, str(transport.path)], env=borg_cli.env(),
                                capture_output=True, text=True, check=True)
        ranges = sorted(tuple(int(n) for n in line.split()) for line in result.stdout.splitlines())
        assert len(ranges) > 12
        overlapping = [(x, y) for x, y in itertools.pairwise(ranges) if y[0] < x[1]]
        assert overlapping == []
