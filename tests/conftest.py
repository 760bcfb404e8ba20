"""Shared fixtures: real borg repositories in temporary folders, the borg CLI, real VDI images."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import PASSPHRASE, BorgCLI

import vbremote
from vbremote.testing import MIB, make_vdi, qemu_tools_available


@pytest.fixture(autouse=True, scope="session")
def _state_folder_of_the_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Snapshotters and Restorers made without a state folder keep their locks in the run's own folder,
    never in the home folder of whoever runs the tests (subprocesses inherit it)."""
    before = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("xdg-state"))
    yield
    if before is None:
        del os.environ["XDG_STATE_HOME"]
    else:
        os.environ["XDG_STATE_HOME"] = before


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    """A private borg base folder (keys, cache, security data) for one test."""
    path = tmp_path / "borg-base"
    path.mkdir()
    return path


@pytest.fixture
def borg_cli(base_dir: Path) -> BorgCLI:
    return BorgCLI(base_dir)


@pytest.fixture
def transport(tmp_path: Path) -> vbremote.LocalTransport:
    return vbremote.LocalTransport(tmp_path / "repo")


@pytest.fixture
def repo(transport: vbremote.LocalTransport, base_dir: Path) -> Iterator[vbremote.Repository]:
    """A fresh repokey repository, open."""
    with vbremote.Repository.init(transport, passphrase=PASSPHRASE, base_dir=base_dir) as repository:
        yield repository


@pytest.fixture
def vm_folder(tmp_path: Path) -> Path:
    """A VM-like folder: settings file, a real 32 MiB VDI made by qemu-img, an NVRAM file."""
    if not qemu_tools_available():
        pytest.skip("qemu-img/qemu-io are not installed (Debian package qemu-utils)")
    folder = tmp_path / "vm"
    folder.mkdir()
    (folder / "vm.vbox").write_text('<?xml version="1.0"?>\n<VirtualBox version="1.19-linux"/>\n')
    make_vdi(folder / "vm.vdi", 32 * MIB, seed=7)
    (folder / "vm.nvram").write_bytes(os.urandom(64 * 1024))
    return folder
