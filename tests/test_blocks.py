"""Block-level access: all chunk lists in one pass, zero-block ids, local ids at any ranges, read-ahead bounds."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import threading
from pathlib import Path

import pytest
from helpers import PASSPHRASE, disk_content, metadata
from hypothesis import given
from hypothesis import strategies as st
from test_ssh import SSHServer, sshd  # noqa: F401 - the real sshd fixture, shared

import vbremote
from vbremote import _repository as repository_module
from vbremote._borg._idhash import IdHasher, ReadAheadMeter, hash_ranges
from vbremote._borg._items import MAX_CHUNK_SIZE, contents_from_rows
from vbremote.testing import MIB

REG = stat.S_IFREG | 0o644


def _disk(repo: vbremote.Repository, tmp_path: Path, blocks: int, *, name: str = "a", seed: int = 1) -> Path:
    image = tmp_path / f"{name}.img"
    image.write_bytes(disk_content(blocks, seed=seed))
    repo.write_archive(name, [vbremote.FileSpec(image, "disk.img", vbremote.FileRole.DISK)], metadata())
    return image


class TestChunkLists:
    def test_every_file_with_offsets_in_one_call(self, repo, tmp_path):
        """chunk_lists gives each stored file's chunks and offsets, the same as chunk_list per path."""
        image = tmp_path / "d.img"
        image.write_bytes(disk_content(5, seed=2) + b"tail")
        nvram = tmp_path / "n"
        nvram.write_bytes(os.urandom(70_000))
        repo.write_archive("a", [
            vbremote.FileSpec(image, "disk.img", vbremote.FileRole.DISK),
            vbremote.FileSpec(nvram, "sub/vm.nvram", vbremote.FileRole.NVRAM),
        ], metadata())
        contents = repo.chunk_lists("a")
        files = contents.files()
        assert set(files) == {"disk.img", "sub/vm.nvram"}
        for path, chunks in files.items():
            assert chunks == repo.chunk_list("a", path)
        disk = files["disk.img"]
        assert [c.offset for c in disk.chunks] == [i * MIB for i in range(6)]
        assert disk.size == image.stat().st_size
        assert all(item.kind is vbremote.ItemKind.FILE and item.is_plain_file for item in contents.items)
        assert contents.others() == ()

    def test_missing_archive(self, repo):
        """An unknown archive raises ArchiveNotFound naming it."""
        with pytest.raises(vbremote.ArchiveNotFound) as caught:
            repo.chunk_lists("nope")
        assert caught.value.archive == "nope"


    @pytest.mark.parametrize(("bound", "value"), [("MAX_LISTED_ITEMS", 1), ("MAX_LISTED_CHUNKS", 5)])
    def test_absurd_listings_refused_as_they_are_read(self, repo, tmp_path, monkeypatch, bound, value):
        """More items or chunks than the bounds allow: ArchiveInvalid naming the archive (bounds lowered to
        fit a test); the listing stops in the worker, where it is read."""
        image = tmp_path / "d.img"
        image.write_bytes(disk_content(6, seed=3))
        (tmp_path / "n").write_bytes(b"nvram")
        repo.write_archive("a", [
            vbremote.FileSpec(image, "disk.img", vbremote.FileRole.DISK),
            vbremote.FileSpec(tmp_path / "n", "vm.nvram", vbremote.FileRole.NVRAM),
        ], metadata())
        assert len(repo.chunk_lists("a").files()["disk.img"].chunks) == 6
        monkeypatch.setattr(repository_module, bound, value)
        with pytest.raises(vbremote.ArchiveInvalid, match="refused as absurd") as caught:
            repo.chunk_lists("a")
        assert caught.value.archive == "a"
        assert [a.name for a in repo.archives()] == ["a"]  # in step afterwards


class TestArchiveValidation:
    """What the worker reads from an archive is checked before it becomes a value."""

    ID = bytes(32)

    def test_valid_rows(self):
        """A file, a directory, a symlink and a hard link become typed items."""
        contents = contents_from_rows("a", [
            ("d", stat.S_IFDIR | 0o755, None, None, None, False),
            ("d/f", REG, 3, [(self.ID, 1), (self.ID, 2)], None, True),
            ("d/g", REG, None, None, "d/f", False),
            ("d/l", stat.S_IFLNK | 0o777, None, None, "../x", False),
        ], location="here")
        kinds = {item.path: item.kind for item in contents.items}
        assert kinds == {"d": vbremote.ItemKind.DIRECTORY, "d/f": vbremote.ItemKind.FILE,
                         "d/g": vbremote.ItemKind.FILE, "d/l": vbremote.ItemKind.SYMLINK}
        assert [c.offset for c in contents.file("d/f").chunks] == [0, 1]
        assert set(contents.files()) == {"d/f"}
        assert {i.path for i in contents.others()} == {"d", "d/f", "d/g", "d/l"}  # hard links are not plain

    @pytest.mark.parametrize(
        ("row", "words"),
        [
            (("../../etc/cron.d/x", REG, 0, [], None, False), "leaves"),
            (("/etc/passwd", REG, 0, [], None, False), "absolute"),
            (("a/./b", REG, 0, [], None, False), "normalised"),
            (("a/../../b", REG, 0, [], None, False), "normalised"),
            (("", REG, 0, [], None, False), "empty"),
            (("f", REG, 5, [(ID, 4)], None, False), "stored size"),
            (("f", REG, None, [(ID, 0)], None, False), "chunk size"),
            (("f", REG, None, [(ID, MAX_CHUNK_SIZE + 1)], None, False), "chunk size"),
            (("f", REG, None, [(b"short", 4)], None, False), "chunk id"),
            (("f", 0o170000 | 0o644, None, None, None, False), "unknown item type"),
            (("f", REG, None, None, "../../outside", False), "leaves"),
            (("l", stat.S_IFLNK | 0o777, None, [(ID, 4)], "t", False), "with content"),
            (("f", REG), "wrong shape"),
        ],
    )
    def test_hostile_rows_are_refused(self, row, words):
        """Paths leaving the folder, absolute or unnormalised paths, sizes that do not add up: ArchiveInvalid."""
        with pytest.raises(vbremote.ArchiveInvalid, match=words) as caught:
            contents_from_rows("evil", [row], location="here")
        assert caught.value.archive == "evil"
        assert "'evil'" in str(caught.value)

    def test_duplicate_path(self):
        """A path that appears twice is refused."""
        row = ("f", REG, 0, [], None, False)
        with pytest.raises(vbremote.ArchiveInvalid, match="twice"):
            contents_from_rows("a", [row, row], location="")

    @given(st.lists(st.sampled_from(["a", "b", "..", ".", "", "c/"]), min_size=1, max_size=5))
    def test_accepted_paths_stay_inside(self, parts):
        """Any path accepted is relative, normalised and free of '..' components."""
        path = "/".join(parts)
        try:
            contents = contents_from_rows("a", [(path, REG, 0, [], None, False)], location="")
        except vbremote.ArchiveInvalid:
            return
        accepted = contents.items[0].path
        assert not accepted.startswith("/")
        assert ".." not in accepted.split("/")
        assert os.path.normpath(accepted) == accepted


class TestIdHash:
    @pytest.mark.parametrize("encryption", vbremote.ENCRYPTION_MODES)
    def test_ids_here_equal_the_workers(self, tmp_path, base_dir, encryption):
        """For every encryption mode, ids hashed in this process equal the ids borg's key gave the stored chunks."""
        transport = vbremote.LocalTransport(tmp_path / "r")
        with vbremote.Repository.init(
            transport, encryption=encryption, passphrase=PASSPHRASE, base_dir=base_dir
        ) as repo:
            image = _disk(repo, tmp_path, 4, seed=3)
            stored = repo.chunk_lists("a").file("disk.img")
            data = image.read_bytes()
            assert [repo.chunk_id(data[c.offset:c.offset + c.size]) for c in stored.chunks] == [
                c.id for c in stored.chunks
            ]
            assert repo.local_ids(image, stored.chunks) == [c.id for c in stored.chunks]
            # disk_content makes every third block zero
            assert stored.chunks[2].id == repo.zero_chunk_id(MIB)

    def test_known_constructions(self):
        """The three constructions are HMAC-SHA256, BLAKE2b-256 over key and data, and plain SHA-256."""
        import hmac

        key32, key128 = os.urandom(32), os.urandom(64) + bytes(64)
        data = os.urandom(1000)
        assert IdHasher("hmac-sha256", key=key32)(data) == hmac.new(key32, data, "sha256").digest()
        assert IdHasher("blake2b-256", key=key128)(data) == hashlib.blake2b(key128 + data, digest_size=32).digest()
        assert IdHasher("sha256", key=b"")(data) == hashlib.sha256(data).digest()

    def test_probe_mismatch_is_refused(self):
        """A worker whose id of the probe differs from ours is refused."""
        with pytest.raises(ValueError, match="differs"):
            IdHasher.from_worker("sha256", b"", bytes(32))

    @given(
        algorithm=st.sampled_from([("hmac-sha256", bytes(range(32))), ("blake2b-256", bytes(range(128))),
                                   ("sha256", b"")]),
        sizes=st.lists(st.integers(1, 12_000), min_size=1, max_size=8),
    )
    def test_zero_ids_in_any_order(self, algorithm, sizes):
        """The zero id of each size, asked for in any order, is the id of that many zero bytes."""
        hasher = IdHasher(algorithm[0], key=algorithm[1])
        assert [hasher.zero_id(n) for n in sizes] == [hasher(bytes(n)) for n in sizes]

    def test_zero_ids_across_pieces(self):
        """Zero ids of sizes around the 8 MiB hashing piece, largest first, then in between, are right."""
        hasher = IdHasher("hmac-sha256", key=bytes(range(32)))
        sizes = [17 * MIB + 5, 3, 8 * MIB, 8 * MIB + 1, 9 * MIB, 8 * MIB + 1]
        assert [hasher.zero_id(n) for n in sizes] == [hasher(bytes(n)) for n in sizes]

    def test_zero_chunk_id_rejects_bad_sizes(self, repo):
        """A size below 1 is a ConfigurationError."""
        with pytest.raises(vbremote.ConfigurationError):
            repo.zero_chunk_id(0)


class TestLocalIds:
    def test_ranges_past_the_end_are_missing(self, repo, tmp_path):
        """Ranges wholly or partly past the end come back as None; the others are hashed."""
        f = tmp_path / "f"
        data = os.urandom(3 * MIB + 100)
        f.write_bytes(data)
        ranges = [(0, MIB), (3 * MIB, 100), (3 * MIB, 101), (4 * MIB, MIB), (100, 7)]
        ids = repo.local_ids(f, ranges)
        assert ids == [
            repo.chunk_id(data[:MIB]), repo.chunk_id(data[3 * MIB:]), None, None, repo.chunk_id(data[100:107])
        ]

    def test_large_ranges_are_hashed_in_pieces(self, repo, tmp_path):
        """A range above the piece size has the same id as the whole data hashed at once."""
        f = tmp_path / "f"
        data = os.urandom(20 * MIB)
        f.write_bytes(data)
        zero = tmp_path / "z"
        zero.write_bytes(bytes(17 * MIB))
        assert repo.local_ids(f, [(1, 19 * MIB)]) == [repo.chunk_id(data[1:19 * MIB + 1])]
        assert repo.local_ids(zero, [(0, 17 * MIB)]) == [repo.zero_chunk_id(17 * MIB)]

    def test_bad_input(self, repo, tmp_path):
        """Negative offsets, empty ranges, a folder or a missing file: ConfigurationError."""
        f = tmp_path / "f"
        f.write_bytes(b"x")
        for ranges in ([(-1, 1)], [(0, 0)], [(0,)], [("0", 1)]):
            with pytest.raises(vbremote.ConfigurationError):
                repo.local_ids(f, ranges)
        with pytest.raises(vbremote.ConfigurationError):
            repo.local_ids(tmp_path, [(0, 1)])
        with pytest.raises(vbremote.ConfigurationError):
            repo.local_ids(tmp_path / "missing", [(0, 1)])

    def test_progress(self, repo, tmp_path):
        """Progress reports hashed bytes up to the total."""
        f = tmp_path / "f"
        f.write_bytes(os.urandom(4 * MIB))
        events: list[vbremote.Progress] = []
        repo.local_ids(f, [(i * MIB, MIB) for i in range(4)], progress=events.append)
        assert events[-1].done == events[-1].total == 4 * MIB
        assert {e.operation for e in events} == {"hash"}

    @pytest.mark.parametrize("api", ["fetch", "fetch_chunks"])
    def test_hashing_while_a_fetch_is_open(self, repo, transport, base_dir, tmp_path, api):
        """local_ids runs while a fetch stream is open: from inside the loop and from another thread."""
        image = _disk(repo, tmp_path, 12, seed=4)
        stored = repo.chunk_list("a", "disk.img")
        expected = [c.id for c in stored.chunks]
        repo.close()
        results: dict[str, object] = {}
        # A repository of the test's own: if hashing waited for the fetch, the
        # stuck stream would hold it forever, and only its worker is killed.
        busy = vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir)

        def scenario() -> None:
            other: list[list[bytes | None]] = []
            thread = threading.Thread(target=lambda: other.append(busy.local_ids(image, stored.chunks)))
            fetched = []
            with contextlib.ExitStack() as stack:
                if api == "fetch":
                    stream = ((c.id, c.data) for c in stack.enter_context(busy.fetch(expected)))
                else:
                    stream = busy.fetch_chunks(expected)
                for i, (chunk_id, _) in enumerate(stream):
                    fetched.append(chunk_id)
                    if i == 0:
                        thread.start()
                        results["inside"] = busy.local_ids(image, stored.chunks)
                        thread.join(60)
                        results["thread"] = other[0] if other else None
            results["fetched"] = fetched

        runner = threading.Thread(target=scenario, daemon=True)
        runner.start()
        runner.join(60)
        if runner.is_alive():
            busy._worker._process.kill()
            pytest.fail("hashing waited for the fetch (deadlock)")
        busy.close()
        distinct = list(dict.fromkeys(expected))  # fetch() sends each distinct id once
        assert results == {
            "inside": expected, "thread": expected, "fetched": distinct if api == "fetch" else expected
        }


class TestHashRanges:
    HASHER = IdHasher("hmac-sha256", key=bytes(range(32)))

    @given(
        data=st.binary(min_size=0, max_size=3000),
        ranges=st.lists(st.tuples(st.integers(0, 3500), st.integers(1, 1200)), max_size=12),
        read_ahead=st.integers(1, 4000),
    )
    def test_any_ranges(self, tmp_path_factory, data, ranges, read_ahead):
        """Any ranges: the id of exactly that data, or None past the end; nothing held afterwards."""
        f = tmp_path_factory.mktemp("h") / "f"
        f.write_bytes(data)
        meter = ReadAheadMeter()
        fd = os.open(f, os.O_RDONLY)
        try:
            ids = hash_ranges(self.HASHER, fd, ranges, read_ahead=read_ahead, meter=meter)
        finally:
            os.close(fd)
        assert ids == [
            self.HASHER(data[o:o + n]) if o + n <= len(data) else None for o, n in ranges
        ]
        assert meter.held == 0
        assert meter.peak <= max(read_ahead, max((n for _, n in ranges), default=0))


    def test_a_failing_progress_stops_the_hashing(self, tmp_path):
        """An exception from the progress callback comes out of hash_ranges, with nothing left held."""
        f = tmp_path / "f"
        f.write_bytes(os.urandom(4 * MIB))
        meter = ReadAheadMeter()
        calls = []

        def progress(done: int) -> None:
            calls.append(done)
            raise KeyboardInterrupt

        fd = os.open(f, os.O_RDONLY)
        try:
            with pytest.raises(KeyboardInterrupt):
                hash_ranges(self.HASHER, fd, [(i * 4096, 4096) for i in range(1024)], read_ahead=MIB, meter=meter,
                            progress=progress)
        finally:
            os.close(fd)
        assert len(calls) == 1
        assert meter.held == 0


class TestReadAhead:
    def test_default_and_validation(self, transport, base_dir):
        """The default is DEFAULT_READ_AHEAD (256 MiB); a limit below 1 byte is refused."""
        assert vbremote.DEFAULT_READ_AHEAD == 256 * MIB
        with pytest.raises(vbremote.ConfigurationError):
            vbremote.Repository.init(transport, passphrase=PASSPHRASE, base_dir=base_dir, read_ahead=0)
        with vbremote.Repository.init(transport, passphrase=PASSPHRASE, base_dir=base_dir) as repo:
            assert repo.read_ahead == vbremote.DEFAULT_READ_AHEAD

    def test_local_hashing_keeps_the_bound(self, transport, base_dir, tmp_path):
        """Local hashing never holds more than read_ahead bytes, whatever the number of ranges."""
        f = tmp_path / "f"
        f.write_bytes(os.urandom(40 * MIB))
        with vbremote.Repository.init(
            transport, passphrase=PASSPHRASE, base_dir=base_dir, read_ahead=3 * MIB
        ) as repo:
            ids = repo.local_ids(f, [(i * MIB, MIB) for i in range(40)])
            assert None not in ids
            meter = repo._local_meter
            assert 0 < meter.peak <= 3 * MIB
            assert meter.held == 0

    def test_worker_writes_keep_the_bound(self, transport, base_dir, tmp_path):
        """A write reads ahead at most read_ahead bytes in the worker (measured there)."""
        image = tmp_path / "d.img"
        image.write_bytes(os.urandom(48 * MIB))
        with vbremote.Repository.init(
            transport, passphrase=PASSPHRASE, base_dir=base_dir, read_ahead=4 * MIB
        ) as repo:
            repo.write_archive("a", [vbremote.FileSpec(image, "d.img", vbremote.FileRole.DISK)], metadata())
            stats = repo._worker.call("stats")
            assert 0 < stats["read_ahead_peak"] <= 4 * MIB
            assert stats["read_ahead_held"] == 0
            assert repo.local_chunk_ids(image) == [c.id for c in repo.chunk_list("a", "d.img").chunks]


@pytest.mark.ssh
class TestOverSSH:
    def test_block_api_over_ssh(self, sshd: SSHServer, tmp_path, base_dir):  # noqa: F811
        """chunk_lists, local_ids, zero ids and fetch work against borg serve over a real sshd."""
        transport = sshd.transport(tmp_path / "repo")
        with vbremote.Repository.init(transport, passphrase=PASSPHRASE, base_dir=base_dir) as repo:
            image = _disk(repo, tmp_path, 7, seed=6)
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir) as repo:
            stored = repo.chunk_lists("a").file("disk.img")
            ids = [c.id for c in stored.chunks]
            assert repo.local_ids(image, stored.chunks) == ids
            assert ids[2] == ids[5] == repo.zero_chunk_id(MIB)
            wanted = [i for i in ids if i != repo.zero_chunk_id(MIB)]
            with repo.fetch(wanted) as chunks:
                data = {chunk.id: chunk.data for chunk in chunks}
            rebuilt = b"".join(data.get(c.id, bytes(c.size)) for c in stored.chunks)
            assert rebuilt == image.read_bytes()
