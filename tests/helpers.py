"""Helpers shared by the tests: the borg CLI as the interop peer, VM-like content."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import vbremote
from vbremote.testing import MIB

PASSPHRASE = "correct horse battery staple"


def borg_executable() -> str:
    """The borg CLI installed with the borg that vbremote uses (same environment)."""
    candidate = Path(sys.executable).parent / "borg"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("borg")
    if found is None:
        pytest.skip("the borg command-line tool is not installed next to this Python")
    return found


class BorgCLI:
    """Runs the real ``borg`` command with a private base folder and the test passphrase."""

    def __init__(self, base_dir: Path, passphrase: str = PASSPHRASE, extra_env: dict[str, str] | None = None) -> None:
        self.base_dir = base_dir
        self.passphrase = passphrase
        self.extra_env = extra_env or {}
        self.executable = borg_executable()

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            BORG_BASE_DIR=str(self.base_dir),
            BORG_PASSPHRASE=self.passphrase,
            BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
            BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
        )
        env.update(self.extra_env)
        return env

    def run(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.executable, *args],
            env=self.env(),
            cwd=cwd,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def __call__(self, *args: str, cwd: Path | None = None) -> str:
        result = self.run(*args, cwd=cwd)
        if result.returncode != 0:
            raise AssertionError(f"borg {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result.stdout

    def check_and_extract(self, repo_path: str | os.PathLike[str], archive: str, out: Path) -> Path:
        """``borg check --verify-data`` of the repository, then ``borg extract`` of ``archive`` into ``out`` (made)."""
        self("check", "--verify-data", os.fspath(repo_path))
        out.mkdir()
        self("extract", f"{os.fspath(repo_path)}::{archive}", cwd=out)
        return out


def metadata(name: str = "dev", vm_uuid: str | None = None, **kwargs: object) -> vbremote.SnapshotMetadata:
    return vbremote.SnapshotMetadata(vm_name=name, vm_uuid=vm_uuid or str(uuid.uuid4()), **kwargs)  # type: ignore[arg-type]


def disk_content(blocks: int, *, seed: int = 0) -> bytes:
    """``blocks`` MiB of distinct random blocks with every third block zero."""
    rng = random.Random(seed)
    return b"".join(bytes(MIB) if i % 3 == 2 else rng.randbytes(MIB) for i in range(blocks))


def vm_specs(folder: Path) -> list[vbremote.FileSpec]:
    return [
        vbremote.FileSpec(folder / "vm.vbox", "vm.vbox", vbremote.FileRole.SETTINGS),
        vbremote.FileSpec(folder / "vm.vdi", "vm.vdi", vbremote.FileRole.DISK),
        vbremote.FileSpec(folder / "vm.nvram", "vm.nvram", vbremote.FileRole.NVRAM),
    ]


@contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A small tmpfs mounted on ``folder`` (e.g. ``size="20m"``) for disk-full tests; skips without mount rights."""
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
