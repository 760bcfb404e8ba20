"""Benchmark of fetching one disk image's chunks, against ``borg extract`` of the same file, in one run.

Run with ``nox -s bench`` (or ``python benchmarks/bench_fetch.py --size 1024``).

One VDI of mixed content (random, text, zeros, repeats; ``make_vdi``) is
written by vbremote (1 MiB blocks, repokey, lz4) into a local repository.
Then, taking turns so that drift of the machine hits both alike:

- vbremote: open, read the archive's chunk lists (:meth:`Repository.chunk_lists`),
  fetch every distinct chunk id of the image once with one
  :meth:`Repository.fetch` stream, all-zero blocks skipped by id
  (:meth:`Repository.zero_chunk_id`), as a restore would; close;
- ``borg extract --stdout`` of the same file into ``/dev/null`` (borg fetches
  every chunk of the file, in order, and writes nothing to disk either).

Both run (a) on the local repository and (b) over SSH to ``borg serve``,
through a private ``sshd`` started on a free loopback port (the same setup
as the SSH tests). The repository's segment files are in the page cache for
both peers (they were just written): the figures compare the pipelines, not
the disk.

What is printed, per mode: median seconds of each peer (open to close), the
ratio vbremote / borg, MiB/s of the image's size, the round trips per GiB,
and the peak resident memory of vbremote's worker and of ``borg extract``.
A round trip here is one call of borg's ``get_many`` in the worker (counted
there): within one call borg keeps its requests in flight on the pipe, and
each call ends with the pipe drained; so it counts the stalls where the
server has nothing asked of it.
"""

from __future__ import annotations

import argparse
import getpass
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import vbremote
from vbremote.testing import MIB, make_vdi

PASSPHRASE = "benchmark"
GIB = 1 << 30


def borg_cli() -> str:
    candidate = Path(sys.executable).parent / "borg"
    return str(candidate) if candidate.exists() else shutil.which("borg") or "borg"


class SSHD:
    """A private sshd on a free loopback port, one key, for this run only."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.user = getpass.getuser()
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        host_key, self.client_key = root / "host_key", root / "client_key"
        for key in (host_key, self.client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        (root / "authorized_keys").write_text(Path(f"{self.client_key}.pub").read_text())
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        config = root / "sshd_config"
        config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}", f"PidFile {root / 'sshd.pid'}",
            f"AuthorizedKeysFile {root / 'authorized_keys'}", "PubkeyAuthentication yes",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
            "StrictModes no", "UsePAM no", f"AllowUsers {self.user}", "",
        ]))
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.process = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stderr=subprocess.DEVNULL)
        pub = Path(f"{host_key}.pub").read_text().split()
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {pub[0]} {pub[1]}\n")
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("sshd did not start") from None
                time.sleep(0.05)

    def options(self) -> tuple[str, ...]:
        return (f"UserKnownHostsFile={self.known_hosts}", "StrictHostKeyChecking=yes")

    def transport(self, path: Path) -> vbremote.SSHTransport:
        return vbremote.SSHTransport(
            "127.0.0.1", str(path), user=self.user, port=self.port, identity_file=self.client_key,
            ssh_options=self.options(), remote_borg=borg_cli(),
        )

    def borg_location(self, path: Path) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}{path}"

    def borg_env(self) -> dict[str, str]:
        options = " ".join(f"-o {o}" for o in self.options())
        return {"BORG_RSH": f"ssh -i {self.client_key} {options}"}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


class Bench:
    def __init__(self, work: Path, size_mib: int, repeat: int) -> None:
        self.work = work
        self.size_mib = size_mib
        self.repeat = repeat
        self.base = work / "borg-base"
        self.base.mkdir()
        self.env = dict(
            os.environ, BORG_BASE_DIR=str(self.base), BORG_PASSPHRASE=PASSPHRASE,
            BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
        )
        self.repo_path = work / "repo"
        self.image = work / "vm" / "disk.vdi"

    def prepare(self) -> None:
        self.image.parent.mkdir()
        make_vdi(self.image, self.size_mib * MIB, seed=21)
        self.writes = [self.write(self.repo_path, vbremote.DEFAULT_READ_AHEAD)]
        os.sync()

    def write(self, path: Path, read_ahead: int) -> dict[str, float]:
        """Archive the image into a new repository; the worker's read-ahead peak and memory."""
        with vbremote.Repository.init(
            vbremote.LocalTransport(path), passphrase=PASSPHRASE, base_dir=self.base, read_ahead=read_ahead
        ) as repo:
            spec = vbremote.FileSpec(self.image, "disk.vdi", vbremote.FileRole.DISK)
            result = repo.write_archive("a", [spec], vbremote.SnapshotMetadata("bench", str(uuid.uuid4())))
            stats = repo._worker.call("stats")
        return {"limit": read_ahead, "seconds": result.seconds, "held_peak": stats["read_ahead_peak"],
                "peak_rss": stats["peak_rss"]}

    def vbremote_fetch(self, transport: vbremote.Transport) -> dict[str, float]:
        """Open, chunk lists, fetch each distinct non-zero chunk once, close: like a restore's fetch."""
        started = time.perf_counter()
        # One repository reached two ways: borg asks whether it moved; it did not.
        with vbremote.Repository.open(
            transport, passphrase=PASSPHRASE, base_dir=self.base, accept_relocated=True
        ) as repo:
            chunks = repo.chunk_lists("a").file("disk.vdi")
            zero_ids = {repo.zero_chunk_id(size) for size in {c.size for c in chunks.chunks}}
            wanted = list(dict.fromkeys(c.id for c in chunks.chunks if c.id not in zero_ids))
            repo._worker.call("stats", reset=True)
            fetch_started = time.perf_counter()
            fetched = 0
            with repo.fetch(wanted) as stream:
                for chunk in stream:
                    fetched += len(chunk.data)
            fetch_s = time.perf_counter() - fetch_started
            stats = repo._worker.call("stats")
        return {
            "total_s": time.perf_counter() - started, "fetch_s": fetch_s, "fetched": fetched,
            "chunks": len(wanted), "all_chunks": len(chunks.chunks), "round_trips": stats["get_many_calls"],
            "peak_rss": stats["peak_rss"],
        }

    def borg_extract(self, location: str, extra_env: dict[str, str]) -> dict[str, float]:
        """borg extract --stdout of the same file into /dev/null, with its peak memory.

        The peak is the process's VmHWM, sampled until it ends: Linux carries
        ru_maxrss over from the forking parent, so wait4's figure would be
        this script's size.
        """
        argv = [borg_cli(), "extract", "--stdout"]
        if location.startswith("ssh://"):
            argv += ["--remote-path", borg_cli()]
        argv += [f"{location}::a", "disk.vdi"]
        started = time.perf_counter()
        with open(os.devnull, "wb") as sink, tempfile.TemporaryFile() as errors:
            process = subprocess.Popen(argv, env={**self.env, **extra_env}, stdout=sink, stderr=errors)
            peak = 0
            while process.poll() is None:
                peak = max(peak, vm_hwm(process.pid))
                time.sleep(0.01)
            seconds = time.perf_counter() - started
            if process.returncode != 0:
                errors.seek(0)
                raise RuntimeError(f"borg extract failed: {errors.read().decode(errors='replace')}")
        return {"total_s": seconds, "peak_rss": peak}

    def alternating(self, *runs: Callable[[], dict[str, float]]) -> list[dict[str, float]]:
        results: list[list[dict[str, float]]] = [[] for _ in runs]
        for _ in range(self.repeat):
            for collected, run in zip(results, runs, strict=True):
                collected.append(run())
        return [{k: statistics.median(r[k] for r in collected) for k in collected[0]} for collected in results]


def vm_hwm(pid: int) -> int:
    """A live process's peak resident memory in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@contextmanager
def private_sshd(root: Path) -> Iterator[SSHD | None]:
    if shutil.which("sshd") is None and not os.path.exists("/usr/sbin/sshd"):
        print("sshd is not installed (Debian openssh-server): the SSH figures are skipped")
        yield None
        return
    root.mkdir()
    server = SSHD(root)
    try:
        yield server
    finally:
        server.stop()


def report(label: str, size: int, ours: dict[str, float], borg: dict[str, float]) -> None:
    ratio = ours["total_s"] / borg["total_s"]
    per_gib = ours["round_trips"] / (ours["fetched"] / GIB) if ours["fetched"] else 0.0
    print(f"{label}")
    print(f"   vbremote {ours['total_s']:7.2f} s  {size / MIB / ours['total_s']:7.0f} MiB/s of the image"
          f"   (fetch alone {ours['fetch_s']:6.2f} s, {ours['fetched'] / MIB / ours['fetch_s']:6.0f} MiB/s fetched)")
    print(f"   borg     {borg['total_s']:7.2f} s  {size / MIB / borg['total_s']:7.0f} MiB/s of the image")
    print(f"   ratio vbremote / borg extract: {ratio:4.2f}")
    print(f"   chunks fetched {ours['chunks']:.0f} of {ours['all_chunks']:.0f} ({ours['fetched'] / MIB:.0f} MiB);"
          f" round trips {ours['round_trips']:.0f}, {per_gib:.1f} per GiB fetched")
    print(f"   peak RSS: vbremote worker {ours['peak_rss'] / MIB:6.1f} MiB,"
          f" borg extract {borg['peak_rss'] / MIB:6.1f} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="size of the VDI in MiB (default 1024)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure, the median is shown")
    parser.add_argument("--no-ssh", action="store_true", help="skip the figures over SSH")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="vbremote-bench-fetch-") as tmp:
        bench = Bench(Path(tmp), args.size, args.repeat)
        print(f"preparing a {args.size} MiB VDI of mixed content and its archive ...", flush=True)
        bench.prepare()
        size = bench.image.stat().st_size
        print(f"image: {size / MIB:.0f} MiB; {os.cpu_count()} CPUs; median of {args.repeat} runs, taken in turn\n")
        bench.writes.append(bench.write(Path(tmp) / "repo-small-read-ahead", 16 * MIB))
        print("write (1 MiB blocks): read-ahead limit, bytes held at most, worker peak RSS")
        for w in bench.writes:
            print(f"   limit {w['limit'] / MIB:4.0f} MiB: held {w['held_peak'] / MIB:6.1f} MiB,"
                  f" RSS {w['peak_rss'] / MIB:6.1f} MiB, {w['seconds']:6.2f} s")
        shutil.rmtree(Path(tmp) / "repo-small-read-ahead")
        local = vbremote.LocalTransport(bench.repo_path)
        ours, borg = bench.alternating(
            lambda: bench.vbremote_fetch(local), lambda: bench.borg_extract(str(bench.repo_path), {})
        )
        report("(a) local repository", size, ours, borg)
        if not args.no_ssh:
            with private_sshd(Path(tmp) / "sshd") as server:
                if server is not None:
                    remote = server.transport(bench.repo_path)
                    ours, borg = bench.alternating(
                        lambda: bench.vbremote_fetch(remote),
                        lambda: bench.borg_extract(server.borg_location(bench.repo_path), server.borg_env()),
                    )
                    report("(b) over SSH to borg serve on loopback", size, ours, borg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
