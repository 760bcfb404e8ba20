"""The restore data path: plan, apply, journal and resume, verify -- real repositories, real files."""

from __future__ import annotations

import errno
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import PASSPHRASE, metadata, tmpfs
from hypothesis import given
from hypothesis import strategies as st
from test_repository import corrupt_one_chunk, swap_two_chunks

import vbremote
from vbremote._models import ChunkRef
from vbremote._restorer import JOURNAL_NAME, RestoreSource, SourceFile, apply_plan, make_plan
from vbremote._restorer import _apply as apply_module
from vbremote._restorer._journal import coalesce, intervals_cover, subtract
from vbremote.testing import MIB, guest_write, make_vdi, qemu_tools_available

pytestmark = pytest.mark.filterwarnings("error")


def restore_source(repo: vbremote.Repository, info: vbremote.ArchiveInfo) -> RestoreSource:
    """A RestoreSource of every file of a vbremote archive, each restored at its archive path."""
    contents = repo.chunk_lists(info)
    files = [
        SourceFile(f.path, f.path, f.role, f.size, contents.file(f.path).chunks)
        for f in info.files
        if f.role is not vbremote.FileRole.SETTINGS
    ]
    return RestoreSource(
        archive=info.name, archive_id=info.id, vm_uuid=info.vm_uuid, vm_name=info.vm_name, mode=info.mode,
        settings_path="restored.vbox", settings=b"", files=files,
    )


class CountingFetch:
    """Counts what really comes out of Repository.fetch streams (bytes and chunk ids)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bytes = 0
        self.ids: list[bytes] = []
        original = vbremote.ChunkStream.__iter__
        counter = self

        def counting(stream: vbremote.ChunkStream) -> Iterator[vbremote.FetchedChunk]:
            for chunk in original(stream):
                counter.bytes += len(chunk.data)
                counter.ids.append(chunk.id)
                yield chunk

        monkeypatch.setattr(vbremote.ChunkStream, "__iter__", counting)


def files_of(folder: Path, names: list[str]) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in names}


@pytest.fixture
def vdi_folder(tmp_path: Path) -> Path:
    """A folder with a real 48 MiB mixed-content VDI, a random 5 MB state file and a small NVRAM file."""
    if not qemu_tools_available():
        pytest.skip("qemu-img/qemu-io are not installed (Debian package qemu-utils)")
    folder = tmp_path / "vm"
    folder.mkdir()
    make_vdi(folder / "disk.vdi", 48 * MIB, seed=3)
    rng = random.Random(4)
    (folder / "state.sav").write_bytes(rng.randbytes(5_000_000))
    (folder / "vm.nvram").write_bytes(rng.randbytes(128 * 1024))
    return folder


NAMES = ["disk.vdi", "state.sav", "vm.nvram"]


def archive_folder(repo: vbremote.Repository, folder: Path, name: str) -> vbremote.ArchiveInfo:
    specs = [
        vbremote.FileSpec(folder / "disk.vdi", "disk.vdi", vbremote.FileRole.DISK),
        vbremote.FileSpec(folder / "state.sav", "state.sav", vbremote.FileRole.STATE),
        vbremote.FileSpec(folder / "vm.nvram", "vm.nvram", vbremote.FileRole.NVRAM),
    ]
    return repo.write_archive(name, specs, metadata(vm_uuid="0b7e3d52-8f0a-4e57-9c57-7d1b2c8f3a10")).archive


def change_guest(disk: Path, fraction: float, seed: int) -> list[int]:
    """Overwrite ``fraction`` of the disk's 1 MiB guest blocks with new random data through the VDI format."""
    rng = random.Random(seed)
    blocks = rng.sample(range(48), max(1, round(48 * fraction)))
    for block in blocks:
        guest_write(disk, block * MIB, rng.randbytes(MIB))
    return blocks


def extract(borg_cli, repo: vbremote.Repository, transport: vbremote.LocalTransport, name: str, into: Path) -> Path:
    """borg extract of the archive (the repository is closed first: borg takes its lock)."""
    repo.close()
    into.mkdir()
    borg_cli("extract", f"{transport.path}::{name}", cwd=into)
    return into


class TestPlan:
    def test_empty_folder_fetches_each_distinct_nonzero_chunk_once(self, repo, vdi_folder, tmp_path):
        """Into an empty folder: every non-zero chunk is fetched, each distinct id once; zero chunks are not."""
        info = archive_folder(repo, vdi_folder, "a")
        source = restore_source(repo, info)
        plan = make_plan(repo, source, tmp_path / "empty")
        chunks = [c for f in source.files for c in f.chunks]
        nonzero = {c.id: c.size for c in chunks if c.id != repo.zero_chunk_id(c.size)}
        assert plan.bytes_to_fetch == sum(nonzero.values())
        assert sum(f.blocks_zero for f in plan.files) == len(chunks) - sum(1 for c in chunks if c.id in nonzero)
        assert sum(f.blocks_reused + f.blocks_copied for f in plan.files) == 0
        assert len(nonzero) < sum(1 for c in chunks if c.id in nonzero)  # the VDI repeats blocks
        assert not (tmp_path / "empty").exists()  # planning writes nothing

    def test_table_lists_every_file_and_totals(self, repo, vdi_folder, tmp_path):
        """table() has a row per file with its counts, and a total row."""
        info = archive_folder(repo, vdi_folder, "a")
        plan = make_plan(repo, restore_source(repo, info), vdi_folder)
        table = plan.table()
        for name in NAMES:
            assert name in table
        assert table.splitlines()[-1].startswith("total")
        assert plan.bytes_to_fetch == 0
        assert plan.bytes_to_write == 0

    def test_no_space_is_a_problem(self, repo, vdi_folder, tmp_path, monkeypatch):
        """A target whose file system has less free space than the restore grows by gets a no-space problem."""
        info = archive_folder(repo, vdi_folder, "a")
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage._replace(free=1000))
        plan = make_plan(repo, restore_source(repo, info), tmp_path / "empty")
        assert [p.code for p in plan.problems] == ["no-space"]
        assert "problem no-space" in plan.table()


class TestApply:
    def test_empty_folder_identical_to_borg_extract(self, repo, transport, vdi_folder, borg_cli, tmp_path):
        """A restore into an empty folder gives files byte-identical to borg extract, mode 0600, no journal left."""
        info = archive_folder(repo, vdi_folder, "a")
        target = tmp_path / "t"
        stats = apply_plan(repo, make_plan(repo, restore_source(repo, info), target))
        expected = extract(borg_cli, repo, transport, "a", tmp_path / "x")
        assert files_of(target, NAMES) == files_of(expected, NAMES)
        assert all((target / n).stat().st_mode & 0o777 == 0o600 for n in NAMES)
        assert not (target / JOURNAL_NAME).exists()
        assert stats.bytes_verified == stats.bytes_written > 0

    def test_incremental_fetches_only_changed_blocks(
        self, repo, transport, vdi_folder, borg_cli, tmp_path, monkeypatch
    ):
        """In place after 2 % of guest blocks changed: only those blocks' chunks are fetched, the rest reused."""
        info = archive_folder(repo, vdi_folder, "a")
        target = tmp_path / "t"
        shutil.copytree(vdi_folder, target)
        changed = change_guest(target / "disk.vdi", 0.02, seed=9)
        plan = make_plan(repo, restore_source(repo, info), target)
        disk = plan.files[0]
        assert disk.blocks_fetched + disk.blocks_copied + disk.blocks_zero == len(changed)
        counter = CountingFetch(monkeypatch)
        stats = apply_plan(repo, plan)
        assert counter.bytes == stats.bytes_fetched == plan.bytes_to_fetch <= len(changed) * MIB
        assert files_of(target, NAMES) == files_of(extract(borg_cli, repo, transport, "a", tmp_path / "x"), NAMES)

    def test_zero_blocks_never_fetched_and_punched(self, repo, tmp_path, monkeypatch):
        """Zero chunks are never fetched; over local data they become holes, past it they stay unwritten."""
        rng = random.Random(1)
        content = b"".join(bytes(MIB) if i % 2 else rng.randbytes(MIB) for i in range(16))
        info = one_disk(repo, tmp_path, content)
        target = tmp_path / "t"
        target.mkdir()
        (target / "d.img").write_bytes(rng.randbytes(8 * MIB))  # the first half full of other data
        counter = CountingFetch(monkeypatch)
        plan = make_plan(repo, restore_source(repo, info), target)
        stats = apply_plan(repo, plan)
        zero_id = repo.zero_chunk_id(MIB)
        assert zero_id not in counter.ids
        assert plan.files[0].blocks_zero == 8
        assert stats.bytes_zero == 4 * MIB  # four zero blocks lay over old data
        assert (target / "d.img").read_bytes() == content
        assert (target / "d.img").stat().st_blocks * 512 <= 8 * MIB + 64 * 1024

    def test_moved_blocks_copied_not_fetched(self, repo, tmp_path, monkeypatch):
        """Blocks found at another offset of the same file or in another file of the restore are copied."""
        rng = random.Random(2)
        blocks = [rng.randbytes(MIB) for _ in range(10)]
        (tmp_path / "a.img").write_bytes(b"".join(blocks))
        (tmp_path / "b.img").write_bytes(b"".join(blocks[5:]))
        specs = [vbremote.FileSpec(tmp_path / n, n, vbremote.FileRole.DISK) for n in ("a.img", "b.img")]
        info = repo.write_archive("a", specs, metadata()).archive
        target = tmp_path / "t"
        target.mkdir()
        # a.img locally: blocks 0..4 swapped pairwise and 5..9 replaced; b.img missing.
        moved = [blocks[1], blocks[0], blocks[3], blocks[2], blocks[4]] + [rng.randbytes(MIB) for _ in range(4)]
        (target / "a.img").write_bytes(b"".join(moved) + blocks[9])
        counter = CountingFetch(monkeypatch)
        plan = make_plan(repo, restore_source(repo, info), target)
        assert plan.files[0].blocks_copied == 4
        assert plan.files[0].blocks_reused == 2
        assert plan.files[1].blocks_copied == 1
        assert plan.files[1].blocks_fetched == 4
        stats = apply_plan(repo, plan)
        assert (target / "a.img").read_bytes() == b"".join(blocks)
        assert (target / "b.img").read_bytes() == b"".join(blocks[5:])
        # A swap is a cycle: one side is read back after it was overwritten and falls back to a fetch.
        assert counter.bytes == stats.bytes_fetched <= 6 * MIB
        assert stats.bytes_copied >= 3 * MIB

    def test_seeds_used(self, repo, vdi_folder, tmp_path, monkeypatch):
        """A seed file holding the data (an older copy elsewhere) is copied from; nothing is fetched."""
        info = archive_folder(repo, vdi_folder, "a")
        target = tmp_path / "t"
        seeds = tmp_path / "seeds"
        shutil.copytree(vdi_folder, seeds)
        counter = CountingFetch(monkeypatch)
        plan = make_plan(repo, restore_source(repo, info), target, seeds=[seeds / n for n in NAMES])
        assert plan.bytes_to_fetch == 0
        stats = apply_plan(repo, plan)
        assert counter.bytes == 0
        assert stats.bytes_copied > 0
        assert files_of(target, NAMES) == files_of(vdi_folder, NAMES)

    def test_shrink_and_extend(self, repo, tmp_path):
        """A longer local file is cut to the archive's size, a shorter one extended; both end identical."""
        rng = random.Random(5)
        a, b = rng.randbytes(5 * MIB + 123), rng.randbytes(3 * MIB + 7)
        (tmp_path / "a.img").write_bytes(a)
        (tmp_path / "b.bin").write_bytes(b)
        specs = [vbremote.FileSpec(tmp_path / "a.img", "a.img", vbremote.FileRole.DISK),
                 vbremote.FileSpec(tmp_path / "b.bin", "b.bin", vbremote.FileRole.OTHER)]
        info = repo.write_archive("a", specs, metadata()).archive
        target = tmp_path / "t"
        target.mkdir()
        (target / "a.img").write_bytes(a + rng.randbytes(4 * MIB))
        (target / "b.bin").write_bytes(b[: MIB])
        plan = make_plan(repo, restore_source(repo, info), target)
        apply_plan(repo, plan)
        assert (target / "a.img").read_bytes() == a
        assert (target / "b.bin").read_bytes() == b
        assert plan.files[0].blocks_fetched == 0

    def test_zero_block_past_the_local_end(self, repo, tmp_path):
        """A zero block that starts inside a shorter local file and ends past it is never read back short
        (the read-back runs while later blocks are written, before the file has its final size)."""
        rng = random.Random(6)
        head = rng.randbytes(3 * MIB)
        info = one_disk(repo, tmp_path, head + bytes(MIB))
        for attempt in range(8):
            target = tmp_path / f"t{attempt}"
            target.mkdir()
            (target / "d.img").write_bytes(head + rng.randbytes(MIB // 2))
            plan = make_plan(repo, restore_source(repo, info), target)
            assert [a.kind for a in plan.files[0].actions] == ["reuse", "reuse", "reuse", "zero"]
            apply_plan(repo, plan)
            assert (target / "d.img").read_bytes() == head + bytes(MIB)

    def test_symlink_in_target_is_refused(self, repo, vdi_folder, tmp_path):
        """A symlink at a file's place in the target: RestoreError before any write; its target is untouched."""
        info = archive_folder(repo, vdi_folder, "a")
        outside = tmp_path / "outside.bin"
        outside.write_bytes(b"keep")
        target = tmp_path / "t"
        target.mkdir()
        (target / "state.sav").symlink_to(outside)
        with pytest.raises(vbremote.RestoreError) as caught:
            make_plan(repo, restore_source(repo, info), target)
        assert caught.value.path == "state.sav"
        assert outside.read_bytes() == b"keep"
        assert sorted(p.name for p in target.iterdir()) == ["state.sav"]

    def test_another_archive_starts_a_new_plan(self, repo, vdi_folder, tmp_path):
        """A journal of another archive is not trusted: its done blocks are compared, not taken as done."""
        first = archive_folder(repo, vdi_folder, "a")
        change_guest(vdi_folder / "disk.vdi", 0.1, seed=3)
        second = archive_folder(repo, vdi_folder, "b")
        target = tmp_path / "t"
        plan_a = make_plan(repo, restore_source(repo, first), target)
        apply_module.JOURNAL_EVERY_BYTES, saved = 1, apply_module.JOURNAL_EVERY_BYTES
        try:
            with pytest.raises(KeyboardInterrupt):
                apply_plan(repo, plan_a, progress=_interrupt_after(10 * MIB))
        finally:
            apply_module.JOURNAL_EVERY_BYTES = saved
        assert vbremote.RestoreState.load(target).archive_id == first.id
        plan_b = make_plan(repo, restore_source(repo, second), target)
        assert not plan_b.resumed
        assert all(f.blocks_done == 0 for f in plan_b.files)
        assert sum(f.blocks_reused for f in plan_b.files) > 0
        apply_plan(repo, plan_b)
        assert files_of(target, NAMES) == files_of(vdi_folder, NAMES)


class TestPipelined:
    @pytest.fixture
    def changed(self, vdi_folder: Path, tmp_path: Path) -> tuple[Path, Path]:
        """The target folder after 4 guest blocks changed and the state file went; a seed of most of that file."""
        # 12 MB of state: chunks of at most 8 MiB, so at least one lies wholly in the seed's first 11 MB.
        (vdi_folder / "state.sav").write_bytes(random.Random(9).randbytes(12_000_000))
        target = tmp_path / "t"
        shutil.copytree(vdi_folder, target)
        (target / "state.sav").unlink()
        change_guest(target / "disk.vdi", 4 / 48, seed=8)
        seed = tmp_path / "seed"
        seed.write_bytes((vdi_folder / "state.sav").read_bytes()[:11_000_000])
        return target, seed

    def test_known_fetches_are_the_plans_fetches(self, repo, vdi_folder, changed):
        """fetch_known is told, once, exactly the plan's fetches of the sizes hashed first; the plan is the same."""
        target, seed = changed
        source = restore_source(repo, archive_folder(repo, vdi_folder, "a"))
        told: list[list[ChunkRef]] = []
        plan = make_plan(repo, source, target, seeds=[seed], fetch_known=told.append)
        assert plan == make_plan(repo, source, target, seeds=[seed])
        assert len(told) == 1
        fetches = {a.chunk for f in plan.files for a in f.actions if a.kind == "fetch"}
        copies = {a.chunk for f in plan.files for a in f.actions if a.kind == "copy"}
        assert any(c.size != MIB for c in copies)  # the seed's part of the state file is copied, not fetched
        assert set(told[0]) == {c for c in fetches if c.size != MIB}
        assert any(c.size == MIB for c in fetches)  # the changed disk blocks: known only at the end

    def test_prefetched_restore_fetches_each_chunk_once(self, repo, vdi_folder, changed, monkeypatch):
        """A restore whose fetch starts during the plan fetches what the plan says, once, and ends identical."""
        target, seed = changed
        source = restore_source(repo, archive_folder(repo, vdi_folder, "a"))
        counter = CountingFetch(monkeypatch)
        with apply_module.Prefetch(repo, limit=MIB) as prefetch:
            plan = make_plan(repo, source, target, seeds=[seed], fetch_known=prefetch)
            assert prefetch.ids
            stats = apply_plan(repo, plan, prefetch=prefetch)
        assert counter.bytes == stats.bytes_fetched == plan.bytes_to_fetch
        assert sorted(counter.ids) == sorted({a.chunk.id for f in plan.files for a in f.actions if a.kind == "fetch"})
        assert files_of(target, NAMES) == files_of(vdi_folder, NAMES)

    def test_an_unused_prefetch_stops_cleanly(self, repo, vdi_folder, tmp_path):
        """A prefetch left without an apply (a refused plan) stops its fetch; the repository is usable after."""
        source = restore_source(repo, archive_folder(repo, vdi_folder, "a"))
        with apply_module.Prefetch(repo, limit=1) as prefetch:
            make_plan(repo, source, tmp_path / "t", fetch_known=prefetch)
            assert prefetch.ids
            time.sleep(0.5)  # by now the fetch holds a chunk and waits for room
        assert [a.name for a in repo.archives()] == ["a"]
        assert not (tmp_path / "t").exists()


def _interrupt_after(limit: int):  # type: ignore[no-untyped-def]
    def progress(event: vbremote.Progress) -> None:
        if event.done >= limit:
            raise KeyboardInterrupt
    return progress


CHILD = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import vbremote
    from vbremote._restorer import RestoreSource, SourceFile, apply_plan, make_plan
    from vbremote._restorer import _apply

    _apply.JOURNAL_EVERY_BYTES = 2 * 1024 * 1024  # many journal updates, many places to be killed between
    repo_path, base_dir, passphrase, archive, target = sys.argv[1:6]
    with vbremote.Repository.open(
        vbremote.LocalTransport(repo_path), passphrase=passphrase, base_dir=Path(base_dir), lock_wait=30, read_only=True
    ) as repo:
        info = repo.archive(archive)
        contents = repo.chunk_lists(info)
        files = [SourceFile(f.path, f.path, f.role, f.size, contents.file(f.path).chunks) for f in info.files]
        source = RestoreSource(info.name, info.id, info.vm_uuid, info.vm_name, info.mode, "restored.vbox", b"", files)
        with _apply.Prefetch(repo) as prefetch:  # as the Restorer does: fetching starts while the plan hashes
            plan = make_plan(repo, source, target, fetch_known=prefetch)
            print("ready", flush=True)
            stats = apply_plan(repo, plan, prefetch=prefetch)
        print(json.dumps({"fetched": stats.bytes_fetched, "resumed": stats.resumed, "seconds": stats.seconds}))
''')


def run_child(script: Path, args: list[str], kill_after: float | None) -> dict[str, object] | None:
    """Run a restore in a new process; SIGKILL it (and its borg worker) ``kill_after`` s into the apply."""
    env = dict(os.environ, PYTHONPATH=str(Path(vbremote.__file__).parent.parent))
    child = subprocess.Popen(
        [sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env, start_new_session=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line == "ready\n", child.stderr.read() if child.stderr else ""
    if kill_after is not None:
        time.sleep(kill_after)
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            child.stdout.close()
            child.stderr.close()  # type: ignore[union-attr]
            return None
    out, err = child.communicate()
    assert child.returncode == 0, err
    return json.loads(out)  # type: ignore[no-any-return]


def one_disk(repo: vbremote.Repository, tmp_path: Path, data: bytes) -> vbremote.ArchiveInfo:
    """An archive "a" of one disk image, ``d.img``, holding ``data``."""
    (tmp_path / "d.img").write_bytes(data)
    spec = vbremote.FileSpec(tmp_path / "d.img", "d.img", vbremote.FileRole.DISK)
    return repo.write_archive("a", [spec], metadata()).archive


def journal_is_true(target: Path, expected: dict[str, bytes]) -> int:
    """Assert every range the journal records as done holds the archive's bytes; return the bytes recorded."""
    state = vbremote.RestoreState.load(target)
    if state is None:
        return 0
    for f in state.files:
        data = (target / f.path).read_bytes()
        for start, end in f.done:
            assert data[start:end] == expected[f.path][start:end], (f.path, start)
    return state.done_bytes


class TestKillAndResume:
    def test_sigkill_at_20_points_then_resume(self, repo, transport, vdi_folder, base_dir, borg_cli, tmp_path):
        """Killed at 20 random points: the journal is true at each, and the resumed files equal borg extract."""
        archive_folder(repo, vdi_folder, "a")
        repo.close()
        expected = files_of(vdi_folder, NAMES)
        script = tmp_path / "restore.py"
        script.write_text(CHILD)
        target = tmp_path / "t"
        args = [str(transport.path), str(base_dir), PASSPHRASE, "a", str(target)]
        full = run_child(script, args, None)
        assert full is not None
        duration = float(full["seconds"])  # type: ignore[arg-type]
        rng = random.Random(11)
        kills = recorded = 0
        shutil.rmtree(target)
        while kills < 20:
            result = run_child(script, args, rng.uniform(0, duration))
            if result is None:
                kills += 1
                recorded = max(recorded, journal_is_true(target, expected))
                continue
            # Finished before the kill: the folder is complete; start over, into an empty folder.
            assert files_of(target, NAMES) == expected
            assert not (target / JOURNAL_NAME).exists()
            shutil.rmtree(target)
        assert recorded > 0  # some kill fell after a journal update
        run_child(script, args, None)
        assert files_of(target, NAMES) == files_of(extract(borg_cli, repo, transport, "a", tmp_path / "x"), NAMES)

    def test_resume_fetches_only_what_is_left(self, repo, vdi_folder, tmp_path, monkeypatch):
        """Interrupted halfway, the resumed restore trusts the journal and fetches only what is not written."""
        info = archive_folder(repo, vdi_folder, "a")
        source = restore_source(repo, info)
        target = tmp_path / "t"
        counter = CountingFetch(monkeypatch)
        plan = make_plan(repo, source, target)
        monkeypatch.setattr(apply_module, "JOURNAL_EVERY_BYTES", 1)
        with pytest.raises(KeyboardInterrupt):
            apply_plan(repo, plan, progress=_interrupt_after(plan.bytes_to_write // 2))
        first = counter.bytes
        resumed = make_plan(repo, source, target)
        assert resumed.resumed
        assert sum(f.blocks_done for f in resumed.files) > 0
        stats = apply_plan(repo, resumed)
        assert stats.resumed
        # Fetched twice at most: the chunks in flight when it stopped (queued for the writer, in hand).
        in_flight = (apply_module._WRITES_IN_FLIGHT + 2) * max(c.size for f in source.files for c in f.chunks)
        assert counter.bytes <= plan.bytes_to_fetch + in_flight
        assert counter.bytes - first == resumed.bytes_to_fetch
        assert files_of(target, NAMES) == files_of(vdi_folder, NAMES)


class TestJournalCadence:
    def test_journal_recorded_every_second_during_a_slow_restore(self, repo, vdi_folder, tmp_path):
        """While blocks arrive slowly (about 12 MiB/s), the journal records written blocks at least every second."""
        info = archive_folder(repo, vdi_folder, "a")
        target = tmp_path / "t"
        plan = make_plan(repo, restore_source(repo, info), target)
        changes: list[float] = []
        last = -1

        def slow(event: vbremote.Progress) -> None:
            nonlocal last
            state = vbremote.RestoreState.load(target)
            done = state.done_bytes if state is not None else 0
            if done != last:
                changes.append(time.monotonic())
                last = done
            time.sleep(0.08)  # one 1 MiB block per 80 ms: a slow link

        started = time.monotonic()
        apply_plan(repo, plan, progress=slow)
        ended = time.monotonic()
        assert ended - started > 2.0  # slow enough for the old 2-second cadence to show
        gaps = [b - a for a, b in itertools.pairwise([started, *changes])]
        assert len(changes) >= 4
        assert max(gaps) <= 1.0, gaps
        assert files_of(target, NAMES) == files_of(vdi_folder, NAMES)


class TestVerify:
    @pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "pipelined"])
    @pytest.mark.parametrize("damage", ["flipped", "swapped"])
    def test_corrupt_chunk_names_file_and_offset(
        self, repo, transport, vdi_folder, base_dir, tmp_path, damage, pipelined
    ):
        """A flipped byte or two chunks' data swapped: IntegrityError with file and offset; nothing wrong done."""
        info = archive_folder(repo, vdi_folder, "a")
        ids = [c.id for f in repo.chunk_lists(info).files().values() for c in f.chunks]
        repo.close()
        if damage == "flipped":
            corrupt_one_chunk(transport)
        else:
            swap_two_chunks(transport, list(dict.fromkeys(ids)))
        target = tmp_path / "t"
        expected = files_of(vdi_folder, NAMES)
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir) as again:
            source = restore_source(again, info)
            with apply_module.Prefetch(again) as prefetch:
                plan = make_plan(again, source, target, fetch_known=prefetch if pipelined else None)
                with pytest.raises(vbremote.IntegrityError) as caught:
                    apply_plan(again, plan, prefetch=prefetch if pipelined else None)
        error = caught.value
        assert error.path in NAMES
        assert str(error.offset) in str(error)
        if damage == "swapped":
            assert "id verification failed" in str(error)  # caught as it was fetched, not only when read back
        file = next(f for f in source.files if f.target_path == error.path)
        chunk = next(c for c in file.chunks if c.offset == error.offset)
        assert chunk.id.hex() == error.chunk_id
        recorded = journal_is_true(target, expected)
        assert recorded > 0 or pipelined  # (the prefetched chunks are written first: the bad one may be the first)
        state = vbremote.RestoreState.load(target)
        assert state is not None
        done = state.file(error.path)
        assert done is not None
        assert not any(a < chunk.offset + chunk.size and chunk.offset < b for a, b in done.done)

    def test_read_back_mismatch_raises_and_is_not_recorded(self, repo, vdi_folder, tmp_path):
        """A written block that reads back wrong: IntegrityError with file and offset, and not recorded as done."""
        info = archive_folder(repo, vdi_folder, "a")
        target = tmp_path / "t"
        plan = make_plan(repo, restore_source(repo, info), target)
        victim = next(a.chunk for a in plan.files[1].actions if a.kind == "fetch")
        expected = (vdi_folder / "state.sav").read_bytes()[victim.offset + 5]
        rotted = []

        def rot(event: vbremote.Progress) -> None:
            # Bit rot right after the victim block was written, before it is made durable and read back.
            path = target / "state.sav"
            if rotted or not path.exists() or path.stat().st_size <= victim.offset + 5:
                return
            with path.open("r+b") as f:
                f.seek(victim.offset + 5)
                if f.read(1)[0] == expected:
                    f.seek(victim.offset + 5)
                    f.write(bytes([expected ^ 1]))
                    rotted.append(True)

        with pytest.raises(vbremote.IntegrityError) as caught:
            apply_plan(repo, plan, progress=rot)
        assert rotted
        assert (caught.value.path, caught.value.offset) == ("state.sav", victim.offset)
        state = vbremote.RestoreState.load(target)
        assert state is not None
        assert journal_is_true(target, files_of(vdi_folder, NAMES)) > 0
        again = make_plan(repo, restore_source(repo, info), target)
        assert again.files[1].blocks_fetched + again.files[1].blocks_copied == 1
        apply_plan(repo, again)
        assert files_of(target, NAMES) == files_of(vdi_folder, NAMES)


    def test_blocks_an_interrupted_run_recorded_are_read_back_on_resume(self, repo, tmp_path, monkeypatch):
        """A block the journal of an interrupted run records as done is trusted by the plan, so the resumed
        run reads it back: one that rotted meanwhile raises IntegrityError naming it."""
        data = random.Random(10).randbytes(8 * MIB)
        info = one_disk(repo, tmp_path, data)
        target = tmp_path / "t"
        source = restore_source(repo, info)
        monkeypatch.setattr(apply_module, "JOURNAL_EVERY_BYTES", 2 * MIB)

        class Stop(Exception):
            pass

        def stop_late(event: vbremote.Progress) -> None:
            if event.done >= 6 * MIB:
                raise Stop

        with pytest.raises(Stop):
            apply_plan(repo, make_plan(repo, source, target), progress=stop_late)
        state = vbremote.RestoreState.load(target)
        assert state is not None
        ((start, end), *_) = state.file("d.img").done  # type: ignore[union-attr]
        assert end - start >= MIB
        with (target / "d.img").open("r+b") as f:  # the first recorded block rots on the disk
            f.seek(start + 100)
            f.write(bytes([data[start + 100] ^ 1]))
        resumed = make_plan(repo, source, target)
        assert resumed.resumed
        assert resumed.files[0].blocks_done > 0
        with pytest.raises(vbremote.IntegrityError) as caught:
            apply_plan(repo, resumed)
        assert (caught.value.path, caught.value.offset) == ("d.img", start)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 20 MiB tmpfs (needs root and mount rights; skipped otherwise)."""
    with tmpfs(tmp_path / "small", "20m") as folder:
        yield folder


class TestDiskFull:
    def test_full_target_is_typed_consistent_and_resumes(self, repo, vdi_folder, small_fs):
        """A full file system: TargetSpaceError, a true journal, and the restore resumes once there is room."""
        info = archive_folder(repo, vdi_folder, "a")
        source = restore_source(repo, info)
        target = small_fs / "vm"
        plan = make_plan(repo, source, target)
        assert [p.code for p in plan.problems] == ["no-space"]
        with pytest.raises(vbremote.TargetSpaceError) as caught:
            apply_plan(repo, plan)
        assert caught.value.archive == "a"
        expected = files_of(vdi_folder, NAMES)
        # The journal may have had no room for its last update; what it records is true either way.
        journal_is_true(target, expected)
        subprocess.run(["mount", "-o", "remount,size=200m", str(small_fs)], check=True)
        resumed = make_plan(repo, source, target)
        assert resumed.resumed
        assert resumed.problems == ()
        assert resumed.bytes_to_fetch < plan.bytes_to_fetch  # what was written before is reused
        apply_plan(repo, resumed)
        assert files_of(target, NAMES) == expected


class TestCompleteness:
    def test_a_stream_that_ends_early_is_an_error(self, repo, tmp_path, monkeypatch):
        """A fetch stream that ends without its last chunk and without an error: RestoreError, not success;
        what came is recorded, and the next run completes."""
        data = random.Random(8).randbytes(4 * MIB)
        info = one_disk(repo, tmp_path, data)
        target = tmp_path / "t"
        target.mkdir()
        (target / "d.img").write_bytes(random.Random(9).randbytes(4 * MIB))
        source = restore_source(repo, info)
        plan = make_plan(repo, source, target)
        assert plan.files[0].blocks_fetched == 4
        whole = vbremote.ChunkStream.__iter__

        def all_but_the_last(stream: vbremote.ChunkStream) -> Iterator[vbremote.FetchedChunk]:
            yield from list(whole(stream))[:-1]

        with monkeypatch.context() as patched:
            patched.setattr(vbremote.ChunkStream, "__iter__", all_but_the_last)
            with pytest.raises(vbremote.RestoreError, match="3 of the 4 chunks"):
                apply_plan(repo, plan)
        journal_is_true(target, {"d.img": data})
        resumed = make_plan(repo, source, target)
        assert resumed.bytes_to_fetch == MIB
        apply_plan(repo, resumed)
        assert (target / "d.img").read_bytes() == data


class TestDurability:
    def test_every_recorded_block_was_fsynced_and_none_after_a_failed_fsync(self, repo, tmp_path, monkeypatch):
        """Each journal save records only blocks an fsync made durable after they were written; after an
        fsync fails, nothing more is recorded (a later fsync may succeed over lost pages)."""
        data = random.Random(7).randbytes(16 * MIB)
        info = one_disk(repo, tmp_path, data)
        target = tmp_path / "t"
        plan = make_plan(repo, restore_source(repo, info), target)
        monkeypatch.setattr(apply_module, "JOURNAL_EVERY_BYTES", 4 * MIB)
        real_fsync, real_write, real_save = os.fsync, apply_module._Applier.write, vbremote.RestoreState.save
        written = 0  # bytes of d.img written so far, and durable after the last good fsync
        durable = 0
        saves: list[tuple[int, int]] = []  # (bytes the save records, bytes durable then)
        failed = False
        fsyncs = 0

        def write(self: Any, path: str, data: bytes, offset: int) -> None:
            nonlocal written
            real_write(self, path, data, offset)
            written += len(data)

        def fsync(fd: int) -> None:
            nonlocal durable, failed, fsyncs
            if os.readlink(f"/proc/self/fd/{fd}").endswith("d.img"):
                fsyncs += 1
                if fsyncs == 2:
                    failed = True
                    raise OSError(errno.EIO, "writeback lost")
                seen = written
                real_fsync(fd)
                if not failed:
                    durable = seen
                return
            real_fsync(fd)

        def save(self: vbremote.RestoreState, folder: Path) -> None:
            saves.append((self.done_bytes, durable))
            real_save(self, folder)

        monkeypatch.setattr(apply_module._Applier, "write", write)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(vbremote.RestoreState, "save", save)
        with pytest.raises(vbremote.RestoreError, match="writeback lost"):
            apply_plan(repo, plan)
        assert failed
        assert any(recorded > 0 for recorded, _ in saves)  # something was recorded before the failure
        for recorded, durable_then in saves:
            assert recorded <= durable_then, saves
        state = vbremote.RestoreState.load(target)
        assert state is not None
        assert state.done_bytes <= durable


class TestSpace:
    def test_writes_into_holes_count_as_growth(self, repo, small_fs, tmp_path):
        """Data written into the holes of a sparse local file takes space: too much of it is a no-space problem
        before any write (a restore's own zero blocks are holes, so this is the next restore's common case)."""
        data = random.Random(11).randbytes(24 * MIB)
        info = one_disk(repo, tmp_path, data)
        target = small_fs / "vm"
        target.mkdir()
        with (target / "d.img").open("wb") as f:
            f.truncate(24 * MIB)  # all hole: nothing past the end to grow into
        plan = make_plan(repo, restore_source(repo, info), target)
        assert plan.grows_by == 0
        assert [p.code for p in plan.problems] == ["no-space"]
        assert str(24 * MIB) in plan.problems[0].message


class TestVerifyFull:
    def test_full_reads_back_reused_blocks_too(self, repo, vdi_folder, tmp_path):
        """verify="full" also checks blocks the plan reused; "written" does not read them."""
        info = archive_folder(repo, vdi_folder, "a")
        target = tmp_path / "t"
        shutil.copytree(vdi_folder, target)
        source = restore_source(repo, info)
        plan = make_plan(repo, source, target)
        reused = next(a.chunk for a in plan.files[0].actions if a.kind == "reuse" and a.chunk.offset > 0)
        with (target / "disk.vdi").open("r+b") as f:  # changed after the plan was made
            f.seek(reused.offset)
            f.write(b"changed")
        assert apply_plan(repo, plan, verify="written").bytes_verified == 0
        with pytest.raises(vbremote.IntegrityError) as caught:
            apply_plan(repo, plan, verify="full")
        assert (caught.value.path, caught.value.offset) == ("disk.vdi", reused.offset)


class TestJournalFile:
    def test_round_trip_and_atomic_name(self, tmp_path):
        """A saved journal loads back equal; no temporary file is left beside it."""
        state = vbremote.RestoreState(
            archive_id="ab" * 32, archive="a", fingerprint="f",
            files=[vbremote.RestoreFileState("disk.vdi", 10 * MIB, [(MIB, 2 * MIB), (0, MIB), (5 * MIB, 6 * MIB)])],
        )
        state.save(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [JOURNAL_NAME]
        loaded = vbremote.RestoreState.load(tmp_path)
        assert loaded == state
        assert loaded.files[0].done == ((0, 2 * MIB), (5 * MIB, 6 * MIB))
        assert loaded.done_bytes == 3 * MIB

    @pytest.mark.parametrize("text", ["", "{", "[]", '{"version": 99}', '{"version": 1, "files": [{"path": 1}]}',
                                      '{"version":1,"archive_id":"a","archive":"a","fingerprint":"f",'
                                      '"files":[{"path":"d","size":1,"done":[[5,2]]}]}'])
    def test_malformed_journal_is_ignored(self, repo, vdi_folder, tmp_path, text):
        """A journal that does not parse is ignored: the plan compares everything and trusts nothing."""
        (vdi_folder / JOURNAL_NAME).write_text(text)
        assert vbremote.RestoreState.load(vdi_folder) is None
        info = archive_folder(repo, vdi_folder, "a")
        plan = make_plan(repo, restore_source(repo, info), vdi_folder)
        assert not plan.resumed
        assert plan.bytes_to_write == 0


class TestIntervals:
    @given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 20)), max_size=8),
           st.integers(0, 70), st.integers(1, 20), st.integers(0, 70), st.integers(0, 20))
    def test_intervals_match_a_set_model(self, pairs, offset, size, cut_start, cut_size):
        """coalesce, intervals_cover and subtract agree with the same ranges as sets of positions."""
        intervals = [(a, a + n) for a, n in pairs]
        model = {i for a, b in intervals for i in range(a, b)}
        merged = coalesce(intervals)
        assert {i for a, b in merged for i in range(a, b)} == model
        assert all(b < c for (_, b), (c, _) in itertools.pairwise(merged))  # sorted, disjoint, not touching
        assert intervals_cover(merged, offset, size) == all(i in model for i in range(offset, offset + size))
        for a, b in merged:  # the edges: each interval covers itself, and not one position more
            assert intervals_cover(merged, a, b - a)
            assert not intervals_cover(merged, a, b - a + 1)
        cut = subtract(merged, cut_start, cut_start + cut_size)
        assert {i for a, b in cut for i in range(a, b)} == model - set(range(cut_start, cut_start + cut_size))
