"""Benchmark of restores: vbremote against borg extract and the borg mount + rsync method, in one run.

Run with ``nox -s bench`` (or ``python benchmarks/bench_restore.py``) as root:
the link part makes a network namespace. Speeds are reported as ratios
against peers measured in the same run; absolute figures are printed too.

The data: a VM folder with a 1 GiB VDI of mixed content (random, text, zeros,
repeats), a 64 MiB saved state and an NVRAM file, stored as one vbremote
archive the way the Snapshotter stores them (the saved state with zstd,1, the
rest with the repository's lz4). The starting files of each incremental
restore are that folder after the guest rewrote 2 % of its 1 MiB blocks
(through qemu-io) and VirtualBox removed the saved state (as it does when the
VM resumes).

(a) Local repository:
    - incremental restore (open the repository, plan, apply, verify) /
      ``borg extract`` into an empty folder, and / the hash-only limit
      (``Repository.local_ids`` over the starting files at the archive's chunk
      boundaries, on a repository already open); the time of the open is
      printed too;
    - full restore into an empty folder / ``borg extract``;
    - peak RSS of a full restore of a 64 GiB (mostly unallocated, sparse) disk.
(b) A 50 Mbit/s link to a network namespace with sshd (``tc tbf`` both ways):
    - vbremote incremental restore through ``borg serve`` over ssh;
    - the method of the PowerShell tool virtualbox-remote-snapshots: a
      server-side ``borg mount`` of the repository, then ``rsync -vah -e 'ssh
      -Tx -c aes128-gcm@openssh.com' --inplace --info=progress2 --stats
      --delete-before host:MOUNT/ARCHIVE/ TARGET/`` onto the same starting files;
    - ``borg extract`` over ssh into an empty folder;
    - a restore killed (SIGKILL) when half its bytes crossed the link, then
      resumed: bytes received in all / bytes of an uninterrupted restore.
    Wall time and bytes received on the link (the veth's rx_bytes) of each.

Needs: root, iproute2, sshd, rsync, qemu-utils, FUSE (fuse3) and borg's FUSE
binding (the ``bench`` extra: pyfuse3) for the borg mount baseline; a part
whose tools are missing is reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _netns import NetnsLink, NetnsSSHD, NetnsUnavailable, borg_program
from _restoring import restore, transport_to_json

import vbremote
from vbremote._models import STATE_COMPRESSION
from vbremote.testing import MIB, guest_write, make_vdi, mixed_content

PASSPHRASE = "benchmark"
ARCHIVE = "a1"
BIG_ARCHIVE = "big"
SSH_CIPHER_ARGS = ["-T", "-x", "-c", "aes128-gcm@openssh.com"]

Row = dict[str, float]


def timed(run: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = run()
    return time.perf_counter() - started, result


class Bench:
    def __init__(self, work: Path, disk_mib: int, sav_mib: int, repeat: int, rate_mbit: float) -> None:
        self.work = work
        self.disk_mib = disk_mib
        self.sav_mib = sav_mib
        self.repeat = repeat
        self.rate_mbit = rate_mbit
        self.base = work / "borg-base"
        self.base.mkdir()
        self.cli_base = work / "borg-cli-base"
        self.cli_base.mkdir()
        self.repo_path = work / "repo"
        self.transport = vbremote.LocalTransport(self.repo_path)
        self.folder = work / "vm"
        self.start = work / "start"
        self.counter = 0
        self.results: dict[str, object] = {}

    # -- data -------------------------------------------------------------

    def make_data(self) -> None:
        """The archived VM folder, and the starting files of an incremental restore."""
        self.folder.mkdir()
        (self.folder / "vm.vbox").write_text('<?xml version="1.0"?>\n<VirtualBox version="1.19-linux"/>\n' * 50)
        make_vdi(self.folder / "vm.vdi", self.disk_mib * MIB, seed=21)
        with open(self.folder / "vm.sav", "wb") as f:
            for block in mixed_content(self.sav_mib * MIB, seed=22):
                f.write(block)
        (self.folder / "vm.nvram").write_bytes(random.Random(23).randbytes(256 * 1024))
        specs = [
            vbremote.FileSpec(self.folder / "vm.vbox", "vm.vbox", vbremote.FileRole.SETTINGS),
            vbremote.FileSpec(self.folder / "vm.vdi", "vm.vdi", vbremote.FileRole.DISK),
            # The saved state with the compression the Snapshotter gives saved states.
            vbremote.FileSpec(self.folder / "vm.sav", "vm.sav", vbremote.FileRole.STATE,
                              compression=STATE_COMPRESSION),
            vbremote.FileSpec(self.folder / "vm.nvram", "vm.nvram", vbremote.FileRole.NVRAM),
        ]
        meta = vbremote.SnapshotMetadata("bench", str(uuid.uuid4()))
        with vbremote.Repository.init(self.transport, passphrase=PASSPHRASE, base_dir=self.base) as repo:
            result = repo.write_archive(ARCHIVE, specs, meta)
        self.results["archive_stored"] = result.bytes_stored
        # The starting files: the guest ran on and rewrote 2 % of its 1 MiB blocks; the state file is gone.
        self.start.mkdir()
        for name in ("vm.vbox", "vm.vdi", "vm.nvram"):
            shutil.copyfile(self.folder / name, self.start / name)
        rng = random.Random(24)
        count = max(1, self.disk_mib * 2 // 100)
        for block in rng.sample(range(self.disk_mib), count):
            guest_write(self.start / "vm.vdi", block * MIB, rng.randbytes(MIB))
        self.changed_blocks = count
        os.sync()

    def new_dir(self, label: str, *, from_start: bool = False) -> Path:
        self.counter += 1
        path = self.work / f"{label}-{self.counter}"
        if from_start:
            shutil.copytree(self.start, path)
            os.sync()
        else:
            path.mkdir()
        return path

    def borg_env(self, base: Path) -> dict[str, str]:
        return dict(
            os.environ, BORG_BASE_DIR=str(base), BORG_PASSPHRASE=PASSPHRASE,
            BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
        )

    def open(self, transport: vbremote.Transport | None = None) -> vbremote.Repository:
        return vbremote.Repository.open(
            transport or self.transport, passphrase=PASSPHRASE, base_dir=self.base, accept_relocated=True
        )

    # -- (a) local --------------------------------------------------------

    def borg_extract_local(self) -> Row:
        target = self.new_dir("extract")
        seconds, _ = timed(lambda: subprocess.run(
            [borg_program(), "extract", f"{self.repo_path}::{ARCHIVE}"],
            cwd=target, env=self.borg_env(self.cli_base), check=True, capture_output=True,
        ))
        shutil.rmtree(target)
        return {"s": seconds}

    def hash_limit(self) -> Row:
        with self.open() as repo:
            contents = repo.chunk_lists(ARCHIVE).files()

            def hash_all() -> None:
                for path, chunks in contents.items():
                    if (self.start / path).exists():
                        repo.local_ids(self.start / path, chunks.chunks)

            seconds, _ = timed(hash_all)
        return {"s": seconds}

    def vbremote_local(self, *, incremental: bool) -> Row:
        target = self.new_dir("incr" if incremental else "full", from_start=incremental)

        opened: list[float] = []

        def run() -> vbremote.ApplyStats:
            started = time.perf_counter()
            with self.open() as repo:
                opened.append(time.perf_counter() - started)
                return restore(repo, ARCHIVE, target)

        seconds, stats = timed(run)
        assert isinstance(stats, vbremote.ApplyStats)
        self.check_identical(target)
        shutil.rmtree(target)
        return {"s": seconds, "open_s": opened[0], "fetched": stats.bytes_fetched, "written": stats.bytes_written}

    def check_identical(self, target: Path) -> None:
        for name in ("vm.vdi", "vm.sav", "vm.nvram"):
            if not same_file(self.folder / name, target / name):
                raise SystemExit(f"restored {name} differs from the archived file")

    def peak_rss(self, big_gib: int) -> Row:
        """A full restore of a 64 GiB preallocated-sparse VDI in a child process; its peak RSS and its worker's."""
        folder = self.work / "big"
        folder.mkdir()
        (folder / "big.vbox").write_text('<?xml version="1.0"?>\n<VirtualBox version="1.19-linux"/>\n')
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "vdi", "-o", "static=on",
             str(folder / "big.vdi"), f"{big_gib}G"],
            check=True,
        )
        guest_write(folder / "big.vdi", 5 * MIB, random.Random(25).randbytes(4 * MIB))
        big_repo = self.work / "big-repo"
        transport = vbremote.LocalTransport(big_repo)
        with vbremote.Repository.init(transport, passphrase=PASSPHRASE, base_dir=self.base) as repo:
            repo.write_archive(BIG_ARCHIVE, [
                vbremote.FileSpec(folder / "big.vbox", "vm.vbox", vbremote.FileRole.SETTINGS),
                vbremote.FileSpec(folder / "big.vdi", "big.vdi", vbremote.FileRole.DISK),
            ], vbremote.SnapshotMetadata("big", str(uuid.uuid4())))
        target = self.new_dir("big-target")
        child = run_child(transport, self.base, BIG_ARCHIVE, target)
        if not same_file(folder / "big.vdi", target / "big.vdi"):
            raise SystemExit("the restored 64 GiB disk differs from the archived file")
        size = (folder / "big.vdi").stat().st_size
        shutil.rmtree(target)
        shutil.rmtree(folder)
        shutil.rmtree(big_repo)
        return {"size": size, "rss_mib": child["rss_kib"] / 1024, "worker_rss_mib": child["worker_rss_kib"] / 1024,
                "s": child["seconds"]}

    # -- (b) the link -----------------------------------------------------

    def remote(self, sshd: NetnsSSHD, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(sshd.ssh_argv(command), capture_output=True, text=True)

    def borg_mount_available(self, sshd: NetnsSSHD) -> str | None:
        if shutil.which("rsync") is None:
            return "rsync is not installed (Debian package rsync)"
        if not Path("/dev/fuse").exists():
            return "/dev/fuse does not exist"
        python = Path(borg_program()).parent / "python"
        probe = self.remote(sshd, self.remote_env() + f"{shlex.quote(str(python))} -c 'import borg.fuse_impl as f; "
                            "raise SystemExit(not (f.has_pyfuse3 or f.has_llfuse))'")
        if probe.returncode != 0:
            return "borg's FUSE binding is not installed (the bench extra: pyfuse3, needs libfuse3-dev)"
        return None

    def remote_env(self) -> str:
        env = {"BORG_BASE_DIR": str(self.cli_base), "BORG_PASSPHRASE": PASSPHRASE,
               "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}
        if os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        return "env " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " "

    def old_method(self, net: NetnsLink, sshd: NetnsSSHD) -> Row:
        """Server-side borg mount, rsync --inplace from the mount over ssh, unmount (as the PowerShell tool)."""
        target = self.new_dir("rsync", from_start=True)
        mount = self.work / f"mnt-{self.counter}"
        mount.mkdir()
        rx = net.host_rx_bytes()
        started = time.perf_counter()
        mounted = self.remote(sshd, self.remote_env() + f"{borg_program()} mount -o allow_other "
                              f"{shlex.quote(str(self.repo_path))} {shlex.quote(str(mount))}")
        if mounted.returncode != 0:
            raise SystemExit(f"borg mount failed: {mounted.stderr}")
        mount_s = time.perf_counter() - started
        try:
            rsh = shlex.join([*sshd.ssh_base(), *SSH_CIPHER_ARGS])
            rsync = subprocess.run(
                ["rsync", "-vah", "-e", rsh, "--inplace", "--info=progress2", "--stats", "--delete-before",
                 f"{sshd.user}@{net.ns_addr}:{mount}/{ARCHIVE}/", f"{target}/"],
                capture_output=True, text=True,
            )
            rsync_s = time.perf_counter() - started - mount_s
            if rsync.returncode != 0:
                raise SystemExit(f"rsync failed: {rsync.stderr}")
        finally:
            self.remote(sshd, f"fusermount3 -u {shlex.quote(str(mount))} || fusermount -u {shlex.quote(str(mount))}")
        seconds = time.perf_counter() - started
        received = net.host_rx_bytes() - rx
        self.check_identical(target)
        shutil.rmtree(target)
        return {"s": seconds, "rx": received, "mount_s": mount_s, "rsync_s": rsync_s}

    def borg_extract_link(self, net: NetnsLink, sshd: NetnsSSHD) -> Row:
        target = self.new_dir("extract-ssh")
        rx = net.host_rx_bytes()
        env = dict(self.borg_env(self.cli_base), BORG_RSH=shlex.join(sshd.ssh_base()))
        seconds, _ = timed(lambda: subprocess.run(
            [borg_program(), "extract", "--remote-path", borg_program(),
             f"ssh://{sshd.user}@{net.ns_addr}{self.repo_path}::{ARCHIVE}"],
            cwd=target, env=env, check=True, capture_output=True,
        ))
        received = net.host_rx_bytes() - rx
        self.check_identical(target)
        shutil.rmtree(target)
        return {"s": seconds, "rx": received}

    def vbremote_link(self, net: NetnsLink, sshd: NetnsSSHD) -> Row:
        target = self.new_dir("incr-ssh", from_start=True)
        rx = net.host_rx_bytes()

        def run() -> vbremote.ApplyStats:
            with self.open(sshd.transport(self.repo_path)) as repo:
                return restore(repo, ARCHIVE, target)

        seconds, stats = timed(run)
        assert isinstance(stats, vbremote.ApplyStats)
        received = net.host_rx_bytes() - rx
        self.check_identical(target)
        shutil.rmtree(target)
        return {"s": seconds, "rx": received, "fetched": stats.bytes_fetched}

    def killed_and_resumed(self, net: NetnsLink, sshd: NetnsSSHD, whole_rx: float) -> Row:
        """A restore in a child process, SIGKILLed (with its ssh and worker) at half the link bytes, then resumed."""
        target = self.new_dir("killed", from_start=True)
        transport = sshd.transport(self.repo_path)
        rx = net.host_rx_bytes()
        killed_at = run_child(
            transport, self.base, ARCHIVE, target, kill=lambda: net.host_rx_bytes() - rx >= whole_rx / 2
        )
        first = net.host_rx_bytes() - rx
        # The server's borg serve holds the repository lock until it notices that its client is gone.
        deadline = time.monotonic() + 120
        while (self.repo_path / "lock.exclusive").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        rx = net.host_rx_bytes()
        child = run_child(transport, self.base, ARCHIVE, target)
        second = net.host_rx_bytes() - rx
        self.check_identical(target)
        shutil.rmtree(target)
        return {"rx": first + second, "first_rx": first, "killed": float(killed_at.get("killed", 0)),
                "resumed": float(child["resumed"])}


def run_child(
    transport: vbremote.Transport, base: Path, archive: str, target: Path, kill: Callable[[], bool] | None = None
) -> dict[str, float]:
    """Restore in a child process (its own process group); with ``kill``, SIGKILL the group once it says so."""
    argv = [sys.executable, str(Path(__file__).resolve().parent / "_restoring.py"),
            transport_to_json(transport), PASSPHRASE, str(base), archive, str(target)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])]
    ))
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True) as child:
        assert child.stdout is not None
        if kill is not None:
            while child.poll() is None and not kill():
                time.sleep(0.02)
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                return {"killed": 1}
        out, _ = child.communicate()
        if child.returncode != 0:
            raise SystemExit(f"the restoring child failed ({child.returncode})")
    for line in out.splitlines():
        if line.startswith("stats "):
            return dict(json.loads(line[6:]))
    raise SystemExit("the restoring child printed no stats")


def same_file(a: Path, b: Path) -> bool:
    if not b.exists() or a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            block_a = fa.read(16 * MIB)
            if block_a != fb.read(16 * MIB):
                return False
            if not block_a:
                return True


def median(runs: list[Row]) -> Row:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def alternating(repeat: int, *runs: Callable[[], Row]) -> list[Row]:
    """Medians of runs taken in turn, so that drift of the machine hits all alike."""
    results: list[list[Row]] = [[] for _ in runs]
    for _ in range(repeat):
        for collected, run in zip(results, runs, strict=True):
            collected.append(run())
    return [median(collected) for collected in results]


def mib(n: float) -> str:
    return f"{n / MIB:7.1f} MiB"


def verdict(ratio: float, target: float) -> str:
    return f"{ratio:5.2f}x  (target <= {target}x: {'met' if ratio <= target else 'NOT met'})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--disk-mib", type=int, default=1024, help="size of the VDI (default 1024)")
    parser.add_argument("--sav-mib", type=int, default=64, help="size of the saved state (default 64)")
    parser.add_argument("--big-gib", type=int, default=64, help="size of the sparse disk for peak RSS (0: skip)")
    parser.add_argument("--rate-mbit", type=float, default=50.0, help="rate of the link each way (default 50)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per figure, the median is shown")
    parser.add_argument("--parts", default="ab", help="a: local repository, b: the link (default: ab)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="vbremote-bench-restore-") as tmp:
        bench = Bench(Path(tmp), args.disk_mib, args.sav_mib, args.repeat, args.rate_mbit)
        print(f"preparing a {args.disk_mib} MiB VDI, a {args.sav_mib} MiB saved state, their archive and the"
              " starting files ...", flush=True)
        bench.make_data()
        print(f"archive stored {mib(bench.results['archive_stored'])}; {bench.changed_blocks} guest blocks of 1 MiB"
              f" changed in the starting files; {os.cpu_count()} CPUs; median of {args.repeat} run(s)\n", flush=True)
        lines: list[str] = []
        if "a" in args.parts:
            local_part(bench, args, lines)
        if "b" in args.parts:
            link_part(bench, args, lines)
        print("\nratios")
        print("\n".join(lines))
        if args.json:
            args.json.write_text(json.dumps(bench.results, indent=2))
    return 0


def local_part(bench: Bench, args: argparse.Namespace, lines: list[str]) -> None:
    print("(a) local repository", flush=True)
    extract, hashing, incr, full = alternating(
        args.repeat,
        bench.borg_extract_local,
        bench.hash_limit,
        lambda: bench.vbremote_local(incremental=True),
        lambda: bench.vbremote_local(incremental=False),
    )
    print(f"   borg extract (empty folder)    {extract['s']:7.2f} s")
    print(f"   hash-only limit (local_ids)    {hashing['s']:7.2f} s")
    print(f"   vbremote incremental           {incr['s']:7.2f} s   fetched {mib(incr['fetched'])}"
          f"   (opening the repository {incr['open_s']:.2f} s of it)")
    print(f"   vbremote full (empty folder)   {full['s']:7.2f} s   fetched {mib(full['fetched'])}"
          f"   (opening the repository {full['open_s']:.2f} s of it)", flush=True)
    bench.results["local"] = {"borg_extract": extract, "hash_limit": hashing, "incremental": incr, "full": full}
    lines.append(f"   local incremental / borg extract        {verdict(incr['s'] / extract['s'], 0.2)}")
    lines.append(f"   local incremental / hash-only limit     {verdict(incr['s'] / hashing['s'], 1.5)}")
    lines.append(f"   local full / borg extract               {verdict(full['s'] / extract['s'], 0.8)}")
    if args.big_gib:
        big = bench.peak_rss(args.big_gib)
        print(f"   {args.big_gib} GiB sparse disk, full restore: peak RSS {big['rss_mib']:.0f} MiB"
              f" (its borg worker {big['worker_rss_mib']:.0f} MiB) in {big['s']:.1f} s", flush=True)
        bench.results["peak_rss"] = big
        rss = max(big["rss_mib"], big["worker_rss_mib"])
        lines.append(f"   peak RSS, {args.big_gib} GiB sparse disk            {rss:5.0f} MiB (target <= 256 MiB:"
                     f" {'met' if rss <= 256 else 'NOT met'})")


def link_part(bench: Bench, args: argparse.Namespace, lines: list[str]) -> None:
    print(f"\n(b) {args.rate_mbit:g} Mbit/s link to a network namespace (tc tbf both ways, sshd inside)", flush=True)
    try:
        with NetnsLink.create(args.rate_mbit) as net, NetnsSSHD.start(net, bench.work / "sshd") as sshd:
            missing = bench.borg_mount_available(sshd)
            runs: list[Callable[[], Row]] = [lambda: bench.vbremote_link(net, sshd)]
            if missing is None:
                runs.append(lambda: bench.old_method(net, sshd))
            else:
                print(f"   borg mount + rsync: skipped, {missing}")
            ours, *rest = alternating(args.repeat, *runs)
            old = rest[0] if rest else None
            print(f"   vbremote incremental           {ours['s']:7.2f} s   received {mib(ours['rx'])}"
                  f"   (chunks fetched {mib(ours['fetched'])})")
            if old is not None:
                print(f"   borg mount + rsync --inplace   {old['s']:7.2f} s   received {mib(old['rx'])}"
                      f"   (mount {old['mount_s']:.1f} s, rsync {old['rsync_s']:.1f} s)", flush=True)
            killed = bench.killed_and_resumed(net, sshd, ours["rx"])
            print(f"   killed at half, resumed        received {mib(killed['rx'])} in all ({mib(killed['first_rx'])}"
                  " before the kill)", flush=True)
            extract = bench.borg_extract_link(net, sshd)
            print(f"   borg extract over ssh          {extract['s']:7.2f} s   received {mib(extract['rx'])}",
                  flush=True)
    except NetnsUnavailable as error:
        print(f"   skipped: {error}")
        return
    bench.results["link"] = {"vbremote": ours, "borg_mount_rsync": old, "borg_extract": extract, "killed": killed}
    if old is not None:
        lines.append(f"   link: time / borg mount + rsync         {verdict(ours['s'] / old['s'], 0.45)}")
        lines.append(f"   link: bytes / borg mount + rsync        {verdict(ours['rx'] / old['rx'], 0.5)}")
    lines.append(f"   link: time / borg extract               {ours['s'] / extract['s']:5.2f}x")
    lines.append(f"   link: bytes / borg extract              {ours['rx'] / extract['rx']:5.2f}x")
    lines.append(f"   killed at 50 % + resumed / uninterrupted {verdict(killed['rx'] / ours['rx'], 1.05)}")


if __name__ == "__main__":
    sys.exit(main())
