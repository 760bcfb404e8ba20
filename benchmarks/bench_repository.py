"""Benchmark of the repository layer against the borg CLI on the same data, in one run.

Run with ``nox -s bench`` (or ``python benchmarks/bench_repository.py``).
Speeds are reported as ratios against a peer measured in the same run, so
they mean something on a noisy machine; absolute times are printed too.

What it measures, on a VM-like folder with a VDI of mixed content (random,
text, zeros, repeats) and a second version with 2 % of its 1 MiB guest blocks
rewritten through qemu-io:

1. archive write, vbremote versus ``borg create -C lz4 --chunker-params
   fixed,4194304`` into the same kind of repository, full and incremental;
2. local chunk-id hashing versus one single-threaded ``hmac``/``hashlib``
   pass over the same file with the same id function;
3. for 1, 2 and 4 MiB blocks: what the incremental archive stored, and its time;
4. for the id hashes borg offers (HMAC-SHA256, keyed BLAKE2b): full write time.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import vbremote
from vbremote.testing import MIB, guest_write, make_vdi

PASSPHRASE = "benchmark"


def borg_cli() -> str:
    candidate = Path(sys.executable).parent / "borg"
    return str(candidate) if candidate.exists() else shutil.which("borg") or "borg"


class Bench:
    def __init__(self, work: Path, disk_mib: int, repeat: int) -> None:
        self.work = work
        self.disk_mib = disk_mib
        self.repeat = repeat
        self.base = work / "borg-base"
        self.base.mkdir()
        self.env = dict(os.environ, BORG_BASE_DIR=str(self.base), BORG_PASSPHRASE=PASSPHRASE)
        self.folder = work / "vm"
        self.folder.mkdir()
        self.counter = 0
        self.results: dict[str, object] = {}

    # -- data -------------------------------------------------------------

    def make_versions(self) -> None:
        """Version 1 of the VM folder, and the guest writes that make version 2."""
        (self.folder / "vm.vbox").write_text("<VirtualBox/>\n" * 200)
        make_vdi(self.folder / "vm.vdi", self.disk_mib * MIB, seed=11)
        (self.folder / "vm.nvram").write_bytes(random.Random(12).randbytes(256 * 1024))
        rng = random.Random(13)
        count = max(1, self.disk_mib * 2 // 100)
        self.writes = [(i * MIB, rng.randbytes(MIB)) for i in rng.sample(range(self.disk_mib), count)]
        self.v1 = self.work / "v1.vdi"
        shutil.copyfile(self.folder / "vm.vdi", self.v1)
        self.v2 = self.work / "v2.vdi"
        shutil.copyfile(self.v1, self.v2)
        for offset, data in self.writes:
            guest_write(self.v2, offset, data)

    def use(self, version: Path) -> None:
        # The same path for both versions (as a real VM folder), so borg's
        # files cache sees the same file changed, as it would in real use.
        shutil.copyfile(version, self.folder / "vm.vdi")
        os.utime(self.folder / "vm.vdi")
        # Flush the copy now, so its write-back does not land inside a timed run.
        os.sync()

    def specs(self) -> list[vbremote.FileSpec]:
        return [
            vbremote.FileSpec(self.folder / "vm.vbox", "vm.vbox", vbremote.FileRole.SETTINGS),
            vbremote.FileSpec(self.folder / "vm.vdi", "vm.vdi", vbremote.FileRole.DISK),
            vbremote.FileSpec(self.folder / "vm.nvram", "vm.nvram", vbremote.FileRole.NVRAM),
        ]

    def new_repo_path(self) -> Path:
        self.counter += 1
        return self.work / f"repo-{self.counter}"

    # -- runs -------------------------------------------------------------

    def vbremote_pair(self, *, block_size: int, encryption: str = "repokey") -> dict[str, float]:
        """Full then incremental archive with vbremote into a fresh repository."""
        transport = vbremote.LocalTransport(self.new_repo_path())
        meta = vbremote.SnapshotMetadata("bench", str(uuid.uuid4()))
        out: dict[str, float] = {}
        vbremote.Repository.init(
            transport, encryption=encryption, passphrase=PASSPHRASE, block_size=block_size, base_dir=self.base
        ).close()
        results = []
        for version in (self.v1, self.v2):
            self.use(version)
            # Timed like a borg command: open (start the worker, load key and
            # manifest), write, close.
            started = time.perf_counter()
            with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=self.base) as repo:
                results.append(repo.write_archive(version.stem, self.specs(), meta))
            out[("full" if version is self.v1 else "incr") + "_total_s"] = time.perf_counter() - started
        full, incremental = results
        out.update(
            full_s=full.seconds, full_stored=full.bytes_stored,
            incr_s=incremental.seconds, incr_stored=incremental.bytes_stored, incr_new=incremental.bytes_new,
        )
        shutil.rmtree(transport.path)
        return out

    def borg_pair(self) -> dict[str, float]:
        """The same with the borg CLI: borg create -C lz4 --chunker-params fixed,4194304."""
        repo = self.new_repo_path()
        subprocess.run([borg_cli(), "init", "-e", "repokey", str(repo)], env=self.env, check=True,
                       capture_output=True)
        out: dict[str, float] = {}
        for label, version in (("full", self.v1), ("incr", self.v2)):
            self.use(version)
            started = time.perf_counter()
            result = subprocess.run(
                [borg_cli(), "create", "-C", "lz4", "--chunker-params", "fixed,4194304", "--json",
                 f"{repo}::{label}", "vm.vbox", "vm.vdi", "vm.nvram"],
                env=self.env, cwd=self.folder, check=True, capture_output=True, text=True,
            )
            out[f"{label}_s"] = time.perf_counter() - started
            stats = json.loads(result.stdout)["archive"]["stats"]
            out[f"{label}_stored"] = stats["deduplicated_size"]
        shutil.rmtree(repo)
        return out

    def best_of(self, run: Callable[[], dict[str, float]]) -> dict[str, float]:
        """Each figure is the median of the repeats (sizes do not vary)."""
        return median([run() for _ in range(self.repeat)])

    def alternating(self, *runs: Callable[[], dict[str, float]]) -> list[dict[str, float]]:
        """Medians of several runs taken in turn, so that drift of the machine hits all alike."""
        results: list[list[dict[str, float]]] = [[] for _ in runs]
        for _ in range(self.repeat):
            for collected, run in zip(results, runs, strict=True):
                collected.append(run())
        return [median(collected) for collected in results]

    def hashing(self, encryption: str) -> dict[str, float]:
        """vbremote's parallel local ids versus one thread of the same id function."""
        transport = vbremote.LocalTransport(self.new_repo_path())
        with vbremote.Repository.init(
            transport, encryption=encryption, passphrase=PASSPHRASE, base_dir=self.base
        ) as repo:
            chunking = vbremote.Chunking.fixed(4 * MIB)
            repo.local_chunk_ids(self.v1, chunking=chunking)  # warm the page cache
            times = []
            for _ in range(self.repeat):
                started = time.perf_counter()
                repo.local_chunk_ids(self.v1, chunking=chunking)
                times.append(time.perf_counter() - started)
        shutil.rmtree(transport.path)
        key = os.urandom(32)
        if encryption.endswith("blake2"):
            def id_hash(data: bytes) -> bytes:
                return hashlib.blake2b(key + data, digest_size=32).digest()
        else:
            def id_hash(data: bytes) -> bytes:
                return hmac.digest(key, data, "sha256")
        single = []
        size = self.v1.stat().st_size
        for _ in range(self.repeat):
            started = time.perf_counter()
            with open(self.v1, "rb") as f:
                for offset in range(0, size, 4 * MIB):
                    id_hash(os.pread(f.fileno(), 4 * MIB, offset))
            single.append(time.perf_counter() - started)
        return {
            "bytes": size,
            "parallel_s": statistics.median(times),
            "single_s": statistics.median(single),
        }


def median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def mib_s(size: float, seconds: float) -> str:
    return f"{size / MIB / seconds:7.0f} MiB/s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--disk-mib", type=int, default=1024, help="size of the VDI (default 1024)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure, the median is shown")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--sections", default="1234", help="which numbered sections to run (default: 1234)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="vbremote-bench-") as tmp:
        bench = Bench(Path(tmp), args.disk_mib, args.repeat)
        print(f"preparing a {args.disk_mib} MiB VDI and its second version ({len(range(args.disk_mib * 2 // 100))}"
              " rewritten 1 MiB blocks) ...", flush=True)
        bench.make_versions()
        size = sum(p.stat().st_size for p in bench.folder.iterdir())
        print(f"VM folder: {size / MIB:.0f} MiB; {os.cpu_count()} CPUs; median of {args.repeat} runs\n")

        ours4: dict[str, float] | None = None
        if "1" in args.sections:
            borg, ours4 = bench.alternating(bench.borg_pair, lambda: bench.vbremote_pair(block_size=4 * MIB))
            write_section(bench, borg, ours4)
        if "2" in args.sections:
            hash_section(bench)
        if "3" in args.sections:
            block_section(bench, ours4)
        if "4" in args.sections:
            encryption_section(bench)
        if args.json:
            args.json.write_text(json.dumps(bench.results, indent=2))
    return 0


def write_section(bench: Bench, borg: dict[str, float], ours4: dict[str, float]) -> None:
    print("1. archive write, vbremote (4 MiB blocks) / borg create -C lz4 --chunker-params fixed,4194304")
    print("   (vbremote timed from open to close, like a borg command; write alone in brackets)")
    for label in ("full", "incr"):
        ratio = ours4[f"{label}_total_s"] / borg[f"{label}_s"]
        print(f"   {label:<5} vbremote {ours4[f'{label}_total_s']:6.2f} s ({ours4[f'{label}_s']:5.2f} s)"
              f"   borg {borg[f'{label}_s']:6.2f} s   ratio {ratio:4.2f}"
              f"   stored: vbremote {ours4[f'{label}_stored'] / MIB:7.1f} MiB,"
              f" borg {borg[f'{label}_stored'] / MIB:7.1f} MiB")
    bench.results["write"] = {"borg": borg, "vbremote_4mib": ours4}


def hash_section(bench: Bench) -> None:
    print("\n2. local chunk ids: vbremote (parallel) / one thread of the same id hash")
    for encryption in ("repokey", "repokey-blake2"):
        h = bench.hashing(encryption)
        speedup = h["single_s"] / h["parallel_s"]
        print(f"   {encryption:<15} parallel {mib_s(h['bytes'], h['parallel_s'])}   single"
              f" {mib_s(h['bytes'], h['single_s'])}   speed-up {speedup:4.2f}x")
        bench.results[f"hash_{encryption}"] = h


def block_section(bench: Bench, ours4: dict[str, float] | None) -> None:
    print("\n3. block size: the incremental archive (2 % of 1 MiB guest blocks rewritten)")
    sizes = {}
    for block in (1, 2, 4):
        r = (
            ours4
            if block == 4 and ours4 is not None
            else bench.best_of(lambda b=block: bench.vbremote_pair(block_size=b * MIB))
        )
        sizes[block] = r
        print(f"   {block} MiB: stored {r['incr_stored'] / MIB:6.1f} MiB (new data {r['incr_new'] / MIB:6.1f} MiB)"
              f" in {r['incr_s']:5.2f} s; full write {r['full_s']:5.2f} s")
    bench.results["block_sizes"] = sizes


def encryption_section(bench: Bench) -> None:
    print("\n4. id hash: full write time (1 MiB blocks) by encryption mode")
    modes = {}
    for encryption in ("repokey", "repokey-blake2", "authenticated", "none"):
        r = bench.best_of(lambda e=encryption: bench.vbremote_pair(block_size=MIB, encryption=e))
        modes[encryption] = r
        print(f"   {encryption:<20} full {r['full_s']:5.2f} s   incremental {r['incr_s']:5.2f} s")
    bench.results["encryption"] = modes


if __name__ == "__main__":
    sys.exit(main())
