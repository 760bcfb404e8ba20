"""Checkpoint archives: a long write that dies is resumed by the next write, and leaves nothing listed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import PASSPHRASE, BorgCLI, disk_content, metadata

import vbremote
from vbremote.testing import MIB

VM_UUID = "3f1b2a9c-5d7e-4c1a-9b8e-2f6d0c4a7e15"

# The caller: writes a large disk with a short checkpoint interval and, as soon
# as the first checkpoint is reported, SIGKILLs its borg worker and itself.
CRASHING_CALLER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path

    sys.path.insert(0, sys.argv[4])
    from helpers import metadata

    import vbremote

    repo = vbremote.Repository.open(
        vbremote.LocalTransport(Path(sys.argv[1])), passphrase=sys.argv[5], base_dir=Path(sys.argv[2])
    )
    spec = vbremote.FileSpec(Path(sys.argv[3]), "disk.img", vbremote.FileRole.DISK)

    def crash(event):
        if event.operation == "checkpoint":
            print(event.done, flush=True)
            os.kill(repo._worker._process.pid, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)

    repo.write_archive("first", [spec], metadata(vm_uuid=sys.argv[6]), progress=crash, checkpoint_interval=0.1)
    print("finished", flush=True)
    """
)


def borg_names(borg_cli: BorgCLI, repository: Path, *, checkpoints: bool) -> list[str]:
    """The archive names ``borg list`` shows (with ``--consider-checkpoints`` if asked)."""
    wanted = ["--consider-checkpoints"] if checkpoints else []
    args = ["--lock-wait", "10", "list", "--json", *wanted, str(repository)]
    return [a["name"] for a in json.loads(borg_cli(*args))["archives"]]


def part_bytes(borg_cli: BorgCLI, repository: Path, archive: str) -> int:
    """Bytes of the part items (``<path>.borg_part_N``) of an archive, as borg lists them."""
    out = borg_cli("--lock-wait", "10", "list", "--consider-part-files", "--json-lines", f"{repository}::{archive}")
    items = [json.loads(line) for line in out.splitlines()]
    return sum(item["size"] for item in items if ".borg_part_" in item["path"])


def disk(tmp_path: Path, blocks: int, seed: int) -> tuple[vbremote.FileSpec, bytes]:
    content = disk_content(blocks, seed=seed)
    path = tmp_path / "disk.img"
    path.write_bytes(content)
    return vbremote.FileSpec(path, "disk.img", vbremote.FileRole.DISK), content


def new_bytes_after(content: bytes, offset: int) -> int:
    """Plaintext bytes of the distinct non-zero 1 MiB blocks at or after ``offset``."""
    blocks = {content[i : i + MIB] for i in range(offset, len(content), MIB)} - {bytes(MIB)}
    return len(blocks) * MIB


class TestCrashResume:
    def test_killed_write_resumes_from_its_checkpoint(self, transport, base_dir, borg_cli, tmp_path):
        """After the caller and its worker are SIGKILLed past a checkpoint, the next write sends only the rest."""
        vbremote.Repository.init(transport, passphrase=PASSPHRASE, base_dir=base_dir).close()
        spec, content = disk(tmp_path, 192, seed=11)
        tests_folder = str(Path(__file__).parent)
        caller = subprocess.run(
            [sys.executable, "-c", CRASHING_CALLER, str(transport.path), str(base_dir), str(spec.source),
             tests_folder, PASSPHRASE, VM_UUID],
            capture_output=True, text=True, timeout=120, check=False,
        )
        assert caller.returncode == -9, caller.stderr
        reported = int(caller.stdout.split()[0])
        assert 0 < reported < len(content)
        # borg keeps the checkpoint (and hides it from a plain listing).
        assert borg_names(borg_cli, transport.path, checkpoints=True) == ["first.checkpoint"]
        assert borg_names(borg_cli, transport.path, checkpoints=False) == []
        # The worker may have gone on (even to the file's last part) before the kill reached it.
        held = part_bytes(borg_cli, transport.path, "first.checkpoint")
        assert reported <= held <= len(content)
        borg_cli("--lock-wait", "10", "check", str(transport.path))

        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir, lock_wait=5) as repo:
            assert repo.archives() == []
            result = repo.write_archive("second", [spec], metadata(vm_uuid=VM_UUID))
            # (the zero block is the third: stored with the checkpoint unless it held less than that)
            assert result.bytes_new == new_bytes_after(content, held) + (MIB if held < 3 * MIB else 0)
            assert result.bytes_new < new_bytes_after(content, 0)
            assert result.checkpoints_removed == ("first.checkpoint",)
            assert [a.name for a in repo.archives()] == ["second"]
        assert borg_names(borg_cli, transport.path, checkpoints=True) == ["second"]
        borg_cli("check", "--verify-data", str(transport.path))
        borg_cli("extract", f"{transport.path}::second", cwd=tmp_path / "borg-base")
        assert (tmp_path / "borg-base" / "disk.img").read_bytes() == content


class TestCheckpointsDuringAWrite:
    def test_checkpoints_leave_nothing_after_success(self, repo, transport, borg_cli, tmp_path):
        """A write that made checkpoints leaves only its archive: borg lists, checks and extracts it whole."""
        spec, content = disk(tmp_path, 96, seed=12)
        events: list[vbremote.Progress] = []
        result = repo.write_archive("a", [spec], metadata(), progress=events.append, checkpoint_interval=0.01)
        assert result.checkpoints >= 2
        assert len([e for e in events if e.operation == "checkpoint"]) == result.checkpoints
        assert result.bytes_new == new_bytes_after(content, 0) + MIB  # the zero block is stored once too
        assert [a.name for a in repo.archives()] == ["a"]
        assert list(repo.chunk_lists("a").files()) == ["disk.img"]
        repo.close()
        assert borg_names(borg_cli, transport.path, checkpoints=True) == ["a"]
        # Like borg create's own, the archive keeps the part items, hidden from extraction.
        assert part_bytes(borg_cli, transport.path, "a") == len(content)
        borg_cli("check", "--verify-data", str(transport.path))
        out = tmp_path / "out"
        out.mkdir()
        borg_cli("extract", f"{transport.path}::a", cwd=out)
        assert [p.name for p in out.iterdir()] == ["disk.img"]
        assert (out / "disk.img").read_bytes() == content

    def test_reference_counts_hold(self, repo, transport, borg_cli, tmp_path):
        """Deleting an archive that made checkpoints frees only its references: one sharing its chunks stays whole."""
        spec, content = disk(tmp_path, 24, seed=18)
        assert repo.write_archive("a", [spec], metadata(), checkpoint_interval=0.01).checkpoints >= 2
        repo.write_archive("b", [spec], metadata(), checkpoint_interval=None)
        repo.delete_archives(["a"])
        repo.compact()
        assert repo.check(verify_data=True).ok
        repo.close()
        out = borg_cli.check_and_extract(transport.path, "b", tmp_path / "out")
        assert (out / "disk.img").read_bytes() == content

    def test_no_checkpoints_when_disabled(self, repo, tmp_path):
        """checkpoint_interval=None writes no checkpoint, however long the write."""
        spec, _ = disk(tmp_path, 24, seed=13)
        events: list[vbremote.Progress] = []
        result = repo.write_archive("a", [spec], metadata(), progress=events.append, checkpoint_interval=None)
        assert result.checkpoints == 0
        assert not [e for e in events if e.operation == "checkpoint"]

    def test_cancelled_write_keeps_its_checkpoint_unlisted(self, transport, base_dir, borg_cli, tmp_path):
        """A write cancelled after a checkpoint commits no archive; its checkpoint stays hidden until the next write."""
        vbremote.Repository.init(transport, passphrase=PASSPHRASE, base_dir=base_dir).close()
        spec, content = disk(tmp_path, 96, seed=14)

        def cancel(event: vbremote.Progress) -> None:
            if event.operation == "checkpoint":
                raise KeyboardInterrupt

        repo = vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir)
        with pytest.raises(KeyboardInterrupt):
            repo.write_archive("a", [spec], metadata(vm_uuid=VM_UUID), progress=cancel, checkpoint_interval=0.001)
        repo.close()
        assert borg_names(borg_cli, transport.path, checkpoints=False) == []
        assert borg_names(borg_cli, transport.path, checkpoints=True) == ["a.checkpoint"]
        held = part_bytes(borg_cli, transport.path, "a.checkpoint")
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir, lock_wait=5) as again:
            assert again.archives() == []
            with pytest.raises(vbremote.ArchiveNotFound):
                again.archive("a.checkpoint")
            result = again.write_archive("a", [spec], metadata(vm_uuid=VM_UUID), checkpoint_interval=None)
            assert result.bytes_new == new_bytes_after(content, held) + (MIB if held < 3 * MIB else 0)
            assert result.checkpoints_removed == ("a.checkpoint",)
        assert borg_names(borg_cli, transport.path, checkpoints=True) == ["a"]
        borg_cli("check", str(transport.path))

    def test_other_vms_checkpoints_are_kept(self, transport, base_dir, borg_cli, tmp_path):
        """A write removes only the checkpoints of its own VM; another VM's stays for that VM's next write."""
        vbremote.Repository.init(transport, passphrase=PASSPHRASE, base_dir=base_dir).close()
        spec, _ = disk(tmp_path, 48, seed=15)

        def cancel(event: vbremote.Progress) -> None:
            if event.operation == "checkpoint":
                raise KeyboardInterrupt

        repo = vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir)
        with pytest.raises(KeyboardInterrupt):
            repo.write_archive("other", [spec], metadata(vm_uuid=VM_UUID), progress=cancel, checkpoint_interval=0.001)
        repo.close()
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir, lock_wait=5) as again:
            result = again.write_archive("mine", [spec], metadata(), checkpoint_interval=None)
            assert result.checkpoints_removed == ()
        assert sorted(borg_names(borg_cli, transport.path, checkpoints=True)) == ["mine", "other.checkpoint"]


class TestRetention:
    def test_pruning_never_sees_a_checkpoint(self, transport, base_dir, borg_cli, tmp_path):
        """A policy pruning everything but the last archive neither plans nor deletes a VM's checkpoint."""
        vbremote.Repository.init(transport, passphrase=PASSPHRASE, base_dir=base_dir).close()
        spec, _ = disk(tmp_path, 48, seed=19)

        def cancel(event: vbremote.Progress) -> None:
            if event.operation == "checkpoint":
                raise KeyboardInterrupt

        repo = vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir)
        repo.write_archive("old", [spec], metadata(vm_uuid=VM_UUID), checkpoint_interval=None)
        repo.write_archive("new", [spec], metadata(vm_uuid=VM_UUID), checkpoint_interval=None)
        spec, _ = disk(tmp_path, 48, seed=20)  # new data: a write long enough for a checkpoint
        with pytest.raises(KeyboardInterrupt):
            repo.write_archive("newest", [spec], metadata(vm_uuid=VM_UUID), progress=cancel, checkpoint_interval=0.001)
        repo.close()
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir, lock_wait=5) as again:
            pruner = vbremote.Pruner(again, vbremote.KeepRules(last=1))
            plan = pruner.plan(VM_UUID)
            assert [e.archive.name for e in plan.entries] == ["new", "old"]
            assert pruner.prune(VM_UUID).deleted == ("old",)
        assert sorted(borg_names(borg_cli, transport.path, checkpoints=True)) == ["new", "newest.checkpoint"]


class TestRefusals:
    @pytest.mark.parametrize("interval", [0, -1.0, float("inf"), float("nan"), "300"])
    def test_bad_interval(self, repo, tmp_path, interval):
        """A checkpoint interval that is not a positive number of seconds is refused before anything is written."""
        spec, _ = disk(tmp_path, 1, seed=16)
        with pytest.raises(vbremote.ConfigurationError, match="checkpoint_interval"):
            repo.write_archive("a", [spec], metadata(), checkpoint_interval=interval)
        assert repo.archives() == []

    @pytest.mark.parametrize("name", ["a.checkpoint", "a.checkpoint.3"])
    def test_checkpoint_names_refused(self, repo, tmp_path, name):
        """Archive names borg takes for checkpoints are refused (they would never be listed)."""
        spec, _ = disk(tmp_path, 1, seed=17)
        with pytest.raises(vbremote.ConfigurationError, match="checkpoint"):
            repo.write_archive(name, [spec], metadata())
