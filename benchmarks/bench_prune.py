"""Benchmark of planning and pruning, against borg prune + borg compact on the same repository.

Run with ``nox -s bench`` (or ``python benchmarks/bench_prune.py``). Figures:

1. listing a repository of N archives of 20 VMs: the first listing (reads every
   archive's metadata, pipelined) and the next ones (metadata is cached by
   archive id, so only the manifest is read), then planning every VM;
2. planning alone over 10,000 archives of 20 VMs (the policy over listed archives);
3. prune + compact of one VM, vbremote versus ``borg prune`` + ``borg compact``
   on two copies of the same repository, as a ratio.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import vbremote

PASSPHRASE = "benchmark"
RULES = {"daily": 7, "weekly": 4, "monthly": 6}
BORG_RULES = ["--keep-daily", "7", "--keep-weekly", "4", "--keep-monthly", "6"]


def borg_cli() -> str:
    candidate = Path(sys.executable).parent / "borg"
    return str(candidate) if candidate.exists() else shutil.which("borg") or "borg"


def stamps(rng: random.Random, count: int, now: datetime) -> list[datetime]:
    return sorted(now - timedelta(seconds=rng.randint(60, 2 * 365 * 86400)) for _ in range(count))


def synthetic(count: int, vms: int, now: datetime) -> dict[str, list[vbremote.ArchiveInfo]]:
    rng = random.Random(5)
    out = {}
    for v in range(vms):
        meta = vbremote.SnapshotMetadata(f"vm{v:02d}", str(uuid.uuid4()))
        archives = [
            vbremote.ArchiveInfo(name=f"vm{v:02d}-{i}", id=os.urandom(32).hex(), time=t, metadata=meta, files=())
            for i, t in enumerate(stamps(rng, count // vms, now))
        ]
        out[meta.vm_name] = sorted(archives, key=lambda a: a.time, reverse=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archives", type=int, default=2000, help="archives in the real repository (20 VMs)")
    parser.add_argument(
        "--repo", type=Path,
        help="keep the generated repository (and its borg base folder) here, and reuse it when it exists",
    )
    args = parser.parse_args()
    now = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="vbremote-bench-prune-") as tmp:
        work = Path(tmp)
        keep = args.repo or work
        base = keep / "base"
        settings = work / "vm.vbox"
        settings.write_text("<VirtualBox/>\n")
        files = [vbremote.FileSpec(settings, "vm.vbox", vbremote.FileRole.SETTINGS)]
        transport = vbremote.LocalTransport(keep / "repo")
        rng = random.Random(3)
        per_vm = args.archives // 20
        if not Path(transport.path).exists():
            print(f"writing {per_vm * 20} archives of 20 VMs ...", flush=True)
            started = time.perf_counter()
            with vbremote.Repository.init(transport, passphrase=PASSPHRASE, base_dir=base) as repo:
                for v in range(20):
                    meta = vbremote.SnapshotMetadata(f"vm{v:02d}", str(uuid.uuid4()))
                    for i, stamp in enumerate(stamps(rng, per_vm, now)):
                        repo.write_archive(f"vm{v:02d}-{i:05d}", files, meta, timestamp=stamp)
            print(f"   ({time.perf_counter() - started:.0f} s)\n")

        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base, read_only=True) as repo:
            t0 = time.perf_counter()
            count = len(repo.archives())
            t1 = time.perf_counter()
            repo.archives()
            t2 = time.perf_counter()
            pruner = vbremote.Pruner(repo, vbremote.KeepRules(**RULES))
            for v in range(20):
                pruner.plan(f"vm{v:02d}")
            t3 = time.perf_counter()
            pruner.plan_all()
            t4 = time.perf_counter()
        print(f"1. listing {count} archives, then planning each of 20 VMs")
        print(f"   first listing {t1 - t0:6.3f} s   next listing {t2 - t1:6.3f} s   20 plans {t3 - t2:6.3f} s"
              f"   plan_all {t4 - t3:6.3f} s\n")

        print("2. planning alone over 10,000 archives of 20 VMs (KeepRules daily 7, weekly 4, monthly 6)")
        lists = synthetic(10_000, 20, now)
        policy = vbremote.KeepRules(**RULES)
        t0 = time.perf_counter()
        for archives in lists.values():
            policy.decide(archives, now)
        print(f"   {time.perf_counter() - t0:6.3f} s\n")

        print("3. prune + compact of one VM: vbremote / borg prune + borg compact (two copies of the repository)")
        ours_repo = work / "ours"
        theirs_repo = work / "theirs"
        shutil.copytree(transport.path, ours_repo)
        shutil.copytree(transport.path, theirs_repo)
        os.sync()  # so that the copies' write-back does not land inside a timed run
        env = dict(os.environ, BORG_BASE_DIR=str(work / "borg-base"), BORG_PASSPHRASE=PASSPHRASE,
                   BORG_RELOCATED_REPO_ACCESS_IS_OK="yes")
        # Both peers start with a warm cache of their own.
        subprocess.run([borg_cli(), "list", "--short", str(theirs_repo)], env=env, check=True, capture_output=True)
        ours_base = work / "ours-base"
        with vbremote.Repository.open(vbremote.LocalTransport(ours_repo), passphrase=PASSPHRASE, base_dir=ours_base,
                                      accept_relocated=True) as repo:
            repo.archives()  # as `borg list` warms borg's cache, this warms vbremote's metadata cache
        t0 = time.perf_counter()
        with vbremote.Repository.open(vbremote.LocalTransport(ours_repo), passphrase=PASSPHRASE,
                                      base_dir=ours_base) as repo:
            pruner = vbremote.Pruner(repo, vbremote.KeepRules(**RULES), guards=vbremote.Guards(max_age=None))
            result = pruner.prune("vm07")
        ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run([borg_cli(), "prune", "-a", "vm07-*", *BORG_RULES, str(theirs_repo)], env=env, check=True,
                       capture_output=True)
        subprocess.run([borg_cli(), "compact", str(theirs_repo)], env=env, check=True, capture_output=True)
        theirs = time.perf_counter() - t0
        print(f"   vbremote {ours:6.2f} s   borg {theirs:6.2f} s   ratio {ours / theirs:4.2f}"
              f"   (deleted {len(result.deleted)} archives, freed {result.freed_bytes} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
