"""Benchmark of Snapshotter.take() against borg create of the same files, in one run.

Run with ``nox -s bench`` (or ``python benchmarks/bench_snapshot.py``).
Speeds are ratios against a peer measured in the same run, taken in turn so
that drift of a noisy machine hits both alike; absolute times are printed too.

On a simulated VirtualBox host (vbremote.testing.SimulatedVirtualBox) with a
running VM whose disk is 1 GiB of mixed content (random, text, zeros,
repeats), each round:

1. full: ``Snapshotter.take()`` (online: the simulator's snapshot, the
   archive, the merge), timed from opening the repository to closing it like
   a borg command, into a fresh repository; then ``borg create -C lz4
   --chunker-params fixed,4194304`` of the files take() archives (the
   settings, the frozen disk, the instant's saved state and NVRAM copy: borg
   is given a snapshot of its own, untimed, to find them) into a fresh
   repository of the same kind (repokey);
2. the guest rewrites 2 % of its 1 MiB blocks;
3. incremental: the same two again, into the same two repositories.

Both sides start with the disk in the page cache (borg create drops what it
read from it; the disk is read again, untimed, after each borg create).

Then, over a ``borg serve`` reached through a pipe command (a
``CommandTransport``, what ``ssh host borg serve`` is without the network),
a full and an incremental snapshot: the bytes the client sent for the
incremental against the bytes the guest changed, how long the transient
snapshot existed, and the peak resident memory of the borg worker and of
this process.

Both sides run compiled bytecode, as installed software does: a source tree
run with ``PYTHONDONTWRITEBYTECODE`` would compile vbremote's modules again
in every borg worker it starts (borg's own were compiled when it was
installed). So every Python process this run starts, borg's and vbremote's,
keeps its bytecode in a folder of the run (``PYTHONPYCACHEPREFIX``), filled
by an untimed warm-up of both sides before the first round.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import vbremote
from vbremote.testing import MIB, GuestWorkload, SimulatedVirtualBox, Timing

PASSPHRASE = "benchmark"
VM = "bench"

# A pipe to borg serve that counts the bytes going each way, then writes them to argv[1].
RELAY = """
import os, subprocess, sys, threading
child = subprocess.Popen(sys.argv[2:], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
counts = [0, 0]

def pump(src, dst, index, close):
    while True:
        data = os.read(src, 1 << 20)
        if not data:
            break
        counts[index] += len(data)
        view = memoryview(data)
        while view:
            view = view[os.write(dst, view):]
    close()

up = threading.Thread(target=pump, args=(0, child.stdin.fileno(), 0, child.stdin.close), daemon=True)
up.start()
pump(child.stdout.fileno(), 1, 1, lambda: None)
child.wait()
up.join(5)
with open(sys.argv[1], "w") as f:
    f.write(f"{counts[0]} {counts[1]}")
"""


def borg_cli() -> str:
    candidate = Path(sys.executable).parent / "borg"
    return str(candidate) if candidate.exists() else shutil.which("borg") or "borg"


class Bench:
    def __init__(self, work: Path, disk_mib: int) -> None:
        self.work = work
        self.disk_mib = disk_mib
        self.base = work / "borg-base"
        self.base.mkdir()
        self.env = dict(os.environ, BORG_BASE_DIR=str(self.base), BORG_PASSPHRASE=PASSPHRASE)
        self.sim = SimulatedVirtualBox(work / "vbox", version="7.1",
                                       timing=Timing(unlock_delay=0.05, snapshot=0.05, start=0.02))
        self.sim.create_vm(VM, disk_size=disk_mib * MIB, content="mixed", seed=1, firmware="EFI", memory_mb=256)
        self.sim.start(VM, workload=None)
        self.host = vbremote.VirtualBoxHost.connect(manager=self.sim.manager())
        self.folder = self.host.vm(VM).settings_file.parent
        self.counter = 0
        self.rounds = 0

    def close(self) -> None:
        self.sim.close()

    def new_path(self, what: str) -> Path:
        self.counter += 1
        return self.work / f"{what}-{self.counter}"

    def guest_changes(self) -> int:
        """The running guest rewrites 2 % of its 1 MiB blocks (distinct ones); returns the bytes it wrote."""
        self.rounds += 1
        wanted = max(1, self.disk_mib * 2 // 100)
        self.sim.power_off(VM)
        # One 1 MiB write per block, moving on block by block; new data each round.
        self.start(GuestWorkload(rate=100, write_size=MIB, pattern="sequential", seed=self.rounds))
        while self.sim.guest_writes(VM) < wanted:
            time.sleep(0.002)
        self.sim.power_off(VM)
        written = self.sim.guest_writes(VM)
        self.start(None)
        return written * MIB

    def start(self, workload: GuestWorkload | None) -> None:
        """Start the VM once VirtualBox has let go of its lock (unlock_delay after a power off)."""
        for _ in range(100):
            try:
                self.sim.start(VM, workload=workload)
                return
            except Exception as exc:
                if "already locked" not in str(exc):
                    raise
                time.sleep(0.05)
        raise RuntimeError(f"{VM} stayed locked")

    def cache_disk(self) -> None:
        """Read the VM's disk, untimed, so that the next take() finds it in the page cache as borg create did.

        borg's chunker drops what it has read from the page cache
        (``posix_fadvise(..., POSIX_FADV_DONTNEED)`` in borg/chunker.pyx,
        ``dread``), while take() leaves it there: without this, every take()
        after a borg create would read the disk from the device and every
        borg create would find it cached.
        """
        for path in self.folder.glob("*.vdi"):
            with open(path, "rb") as f:
                while f.read(8 * MIB):
                    pass

    def warm_up(self) -> None:
        """One small write by each side, untimed, so that both find their modules compiled from then on."""
        small = self.work / "warm-up"
        small.mkdir()
        (small / "file").write_bytes(os.urandom(MIB))
        spec = vbremote.FileSpec(small / "file", "file", vbremote.FileRole.DISK)
        transport = vbremote.LocalTransport(small / "vbremote")
        vbremote.Repository.init(transport, passphrase=PASSPHRASE, base_dir=self.base).close()
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=self.base) as repo:
            metadata = vbremote.SnapshotMetadata(vm_name="warm-up", vm_uuid=str(uuid.uuid4()))
            repo.write_archive("warm-up", [spec], metadata)
        subprocess.run([borg_cli(), "init", "-e", "repokey", str(small / "borg")], env=self.env, check=True,
                       capture_output=True)
        subprocess.run([borg_cli(), "create", "-C", "lz4", f"{small / 'borg'}::warm-up", "file"], env=self.env,
                       cwd=small, check=True, capture_output=True)
        shutil.rmtree(small)

    # -- the two sides ------------------------------------------------------

    def take(self, transport: vbremote.Transport) -> tuple[float, vbremote.SnapshotResult, dict[str, int]]:
        """Open, take, close: timed like a borg command."""
        started = time.perf_counter()
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=self.base) as repo:
            snapshotter = vbremote.Snapshotter(self.host, repo, state_dir=self.work / "state")
            result = snapshotter.take(VM)
            worker = repo._worker.call("stats")
        return time.perf_counter() - started, result, worker

    def borg_create(self, repo: Path, label: str) -> tuple[float, int]:
        """borg create of what take() archives: the settings, the disk, the instant's saved state and NVRAM.

        The saved state and the NVRAM copy exist only while a snapshot does,
        so borg gets one of its own (a live snapshot, as take() takes),
        deleted after it; only borg create is timed.
        """
        vm = self.host.vm(VM)
        snapshot = self.host.take_snapshot(vm.uuid, "borg-peer", live=True)
        try:
            files = [p.name for p in sorted(self.folder.iterdir()) if p.is_file() and p.suffix in (".vbox", ".vdi")]
            files += [f"Snapshots/{p.name}" for p in sorted((self.folder / "Snapshots").iterdir())
                      if p.suffix in (".sav", ".nvram")]
            os.sync()
            started = time.perf_counter()
            result = subprocess.run(
                [borg_cli(), "create", "-C", "lz4", "--chunker-params", "fixed,4194304", "--json",
                 f"{repo}::{label}", *files],
                env=self.env, cwd=self.folder, check=True, capture_output=True, text=True,
            )
            seconds = time.perf_counter() - started
        finally:
            self.host.delete_snapshot(vm.uuid, snapshot.uuid)
        return seconds, int(json.loads(result.stdout)["archive"]["stats"]["deduplicated_size"])

    def round(self) -> dict[str, float]:
        ours = vbremote.LocalTransport(self.new_path("vbremote"))
        vbremote.Repository.init(ours, passphrase=PASSPHRASE, base_dir=self.base).close()
        theirs = self.new_path("borg")
        subprocess.run([borg_cli(), "init", "-e", "repokey", str(theirs)], env=self.env, check=True,
                       capture_output=True)
        out: dict[str, float] = {}
        for label in ("full", "incr"):
            if label == "incr":
                out["guest_bytes"] = self.guest_changes()
            os.sync()  # the guest's writes reach the disk before, not during, a timed run
            seconds, result, _ = self.take(ours)
            stats = result.stats
            out.update({
                f"{label}_s": seconds, f"{label}_snapshot_s": stats.seconds_snapshot,
                f"{label}_archive_s": stats.seconds_archive, f"{label}_merge_s": stats.seconds_merge,
                f"{label}_transient_s": stats.seconds_transient, f"{label}_read": stats.bytes_read,
                f"{label}_stored": stats.bytes_stored, f"{label}_new": stats.bytes_new,
            })
            seconds, stored = self.borg_create(theirs, label)
            out.update({f"{label}_borg_s": seconds, f"{label}_borg_stored": stored})
            self.cache_disk()
        shutil.rmtree(ours.path)
        shutil.rmtree(theirs)
        return out

    def over_pipe(self) -> dict[str, float]:
        """A full and an incremental snapshot through a counting pipe to borg serve."""
        path = self.new_path("served")
        counts = [self.work / "relay-full", self.work / "relay-incr"]

        def transport(count: Path) -> vbremote.CommandTransport:
            return vbremote.CommandTransport([sys.executable, "-c", RELAY, str(count), borg_cli(), "serve"],
                                             str(path))

        vbremote.Repository.init(transport(self.work / "relay-init"), passphrase=PASSPHRASE,
                                 base_dir=self.base).close()
        out: dict[str, float] = {}
        for label, count in zip(("full", "incr"), counts, strict=True):
            if label == "incr":
                out["guest_bytes"] = self.guest_changes()
            seconds, result, worker = self.take(transport(count))
            sent, received = (int(n) for n in count.read_text().split())
            out.update({
                f"{label}_s": seconds, f"{label}_sent": sent, f"{label}_received": received,
                f"{label}_stored": result.stats.bytes_stored, f"{label}_transient_s": result.stats.seconds_transient,
                f"{label}_worker_rss": worker["peak_rss"],
            })
        shutil.rmtree(path)
        return out


def median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--disk-mib", type=int, default=1024, help="size of the VM's disk (default 1024)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the median is shown (default 3)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="vbremote-bench-") as tmp:
        os.environ["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "bytecode")
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        print(f"preparing a simulated VM with a {args.disk_mib} MiB disk of mixed content ...", flush=True)
        bench = Bench(Path(tmp), args.disk_mib)
        try:
            bench.warm_up()
            rounds = []
            for number in range(args.repeat):
                rounds.append(bench.round())
                print(f"  round {number + 1}: full {rounds[-1]['full_s'] / rounds[-1]['full_borg_s']:.2f}x,"
                      f" incremental {rounds[-1]['incr_s'] / rounds[-1]['incr_borg_s']:.2f}x", flush=True)
            local = median(rounds)
            served = bench.over_pipe()
        finally:
            bench.close()
    this_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report(local, served, this_rss, args.repeat)
    if args.json:
        args.json.write_text(json.dumps({"local": local, "served": served, "rounds": rounds,
                                         "this_rss": this_rss}, indent=2))
    return 0


def report(local: dict[str, float], served: dict[str, float], this_rss: int, repeat: int) -> None:
    print(f"\n1. Snapshotter.take() (online: snapshot, archive, merge; open to close) / borg create -C lz4"
          f" --chunker-params fixed,4194304 of the VM's files; median of {repeat} rounds; {os.cpu_count()} CPUs")
    targets = {"full": 0.8, "incr": 0.6}
    for label in ("full", "incr"):
        ratio = local[f"{label}_s"] / local[f"{label}_borg_s"]
        verdict = "met" if ratio <= targets[label] else "NOT met"
        print(f"   {label:<5} take {local[f'{label}_s']:6.2f} s (snapshot {local[f'{label}_snapshot_s']:.2f},"
              f" archive {local[f'{label}_archive_s']:.2f}, merge {local[f'{label}_merge_s']:.2f})"
              f"   borg create {local[f'{label}_borg_s']:6.2f} s   ratio {ratio:5.3f}"
              f" (target <= {targets[label]}: {verdict})")
        print(f"         read {local[f'{label}_read'] / MIB:7.1f} MiB; stored: vbremote"
              f" {local[f'{label}_stored'] / MIB:7.1f} MiB, borg {local[f'{label}_borg_stored'] / MIB:7.1f} MiB")
        without = local[f"{label}_s"] - local[f"{label}_snapshot_s"]
        print(f"         take without the simulator's snapshot phase {without:6.2f} s:"
              f" {without / local[f'{label}_borg_s']:5.3f}x; the archive phase alone:"
              f" {local[f'{label}_archive_s'] / local[f'{label}_borg_s']:5.3f}x")
    print(f"   the guest changed {local['guest_bytes'] / MIB:.0f} MiB between the two")
    print("\n2. over a pipe to borg serve (CommandTransport; ssh host borg serve without the network)")
    ratio = served["incr_sent"] / served["guest_bytes"]
    print(f"   incremental: sent {served['incr_sent'] / MIB:.2f} MiB for {served['guest_bytes'] / MIB:.0f} MiB the"
          f" guest changed: {ratio:.2f}x (target <= 1.5: {'met' if ratio <= 1.5 else 'NOT met'});"
          f" received {served['incr_received'] / 1024:.0f} KiB")
    print(f"   full: sent {served['full_sent'] / MIB:.1f} MiB, stored {served['full_stored'] / MIB:.1f} MiB,"
          f" {served['full_s']:.2f} s; incremental {served['incr_s']:.2f} s")
    print(f"   the transient snapshot existed {served['full_transient_s']:.2f} s (full),"
          f" {served['incr_transient_s']:.2f} s (incremental)")
    print(f"   peak RSS: borg worker {served['full_worker_rss'] / MIB:.0f} MiB (full),"
          f" {served['incr_worker_rss'] / MIB:.0f} MiB (incremental); this process (simulator included)"
          f" {this_rss / MIB:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
