"""The code examples in the docs run as printed."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest

import vbremote
from vbremote.testing import MIB, SimulatedVirtualBox

DOCS = Path(__file__).parent.parent / "docs"


@pytest.fixture(autouse=True)
def _temporary_files_in_tmp_path(tmp_path, monkeypatch):
    """The examples make their folders with ``tempfile.mkdtemp()``, as a reader would: keep them in tmp_path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def example(page: str, name: str) -> str:
    text = (DOCS / page).read_text()
    found = re.search(rf"<!-- example: {re.escape(name)} -->\n```python\n(.*?)```", text, re.S)
    assert found, f"no example {name!r} in {page}"
    return found.group(1)


def test_live_snapshot_example():
    """docs/virtualbox.md: a live snapshot on the simulator, frozen image, online merge keeps every write."""
    code = example("virtualbox.md", "live-snapshot")
    assert len(code.strip().splitlines()) <= 14
    exec(compile(code, "docs/virtualbox.md", "exec"), {})


def test_snapshot_and_recover_example():
    """docs/snapshots.md: a live snapshot on the simulator, extracted by borg and registered on another host."""
    code = example("snapshots.md", "snapshot-and-recover")
    exec(compile(code, "docs/snapshots.md", "exec"), {})


def test_restore_in_place_example():
    """docs/restores.md: a snapshot on the simulator, the guest changes, the restore in place fetches less."""
    code = example("restores.md", "restore-in-place")
    exec(compile(code, "docs/restores.md", "exec"), {})


def run(page: str, name: str) -> dict[str, object]:
    """Run one example as printed and return its globals."""
    namespace: dict[str, object] = {}
    exec(compile(example(page, name), f"docs/{page}", "exec"), namespace)
    return namespace


class TestRepositoryExamples:
    def test_open_and_list(self):
        """docs/repositories.md: an SSH transport's location without connecting; an encrypted repository opened."""
        namespace = run("repositories.md", "open-and-list")
        assert namespace["remote"].location == "ssh://borg@backup.example.org/srv/borg/vms"

    def test_fetch(self):
        """docs/repositories.md: a stored disk's chunks fetched as one stream rebuild the disk byte for byte."""
        run("repositories.md", "fetch")

    def test_block_compare(self):
        """docs/repositories.md: an unchanged disk compared block by block with its archive needs nothing fetched."""
        run("repositories.md", "block-compare")


class TestRetentionExamples:
    def test_prune(self):
        """docs/retention.md: a policy planned and applied to a VM's archives deletes the one it does not keep."""
        run("retention.md", "prune")

    def test_compose(self):
        """docs/retention.md: two policies combine with | into one policy."""
        assert isinstance(run("retention.md", "compose")["policy"], vbremote.RetentionPolicy)

    def test_own_policy(self):
        """docs/retention.md: subclasses of RetentionPolicy combine with the built-in rules."""
        assert isinstance(run("retention.md", "own-policy")["policy"], vbremote.RetentionPolicy)


class TestRestoreExamples:
    def test_plan_and_restore(self):
        """docs/restores.md: the plan names a running VM as a problem; the restore powers it off."""
        namespace = run("restores.md", "plan-and-restore")
        assert [p.code for p in namespace["plan"].problems] == ["vm-running"]

    def test_seeds(self):
        """docs/restores.md: a seed file's blocks are copied instead of fetched."""
        run("restores.md", "seeds")


class TestSnapshotExamples:
    def test_take(self):
        """docs/snapshots.md: a snapshot of a simulated VM into an archive that carries its labels."""
        run("snapshots.md", "take")


class TestTestingExamples:
    def test_simulator(self):
        """docs/testing.md: an injected fault makes the simulator's next snapshot deletion fail."""
        run("testing.md", "simulator")


class TestTransportExamples:
    def test_check_transport(self):
        """docs/transports.md: check_transport passes for a transport that reaches borg serve."""
        run("transports.md", "check-transport")


class TestVirtualBoxExamples:
    def test_connect_forms(self):
        """docs/virtualbox.md: the three ways to connect name real members; the manager form runs on the simulator."""
        code = example("virtualbox.md", "connect")
        compile(code, "docs/virtualbox.md", "exec")  # the other two forms need a real VirtualBox
        names = set(re.findall(r"vbremote\.VirtualBoxHost\.(\w+)", code))
        assert names == {"connect", "from_pyvbox"}
        assert all(hasattr(vbremote.VirtualBoxHost, name) for name in names)
        manager_form = next(line for line in code.splitlines() if "manager=mgr" in line)
        with SimulatedVirtualBox(tempfile.mkdtemp()) as sim:
            sim.create_vm("dev", disk_size=MIB)
            namespace: dict[str, object] = {"vbremote": vbremote, "mgr": sim.manager()}
            exec(compile(manager_form.strip(), "docs/virtualbox.md", "exec"), namespace)
            host = namespace["host"]
            assert isinstance(host, vbremote.VirtualBoxHost)
            assert host.state("dev").is_running is False


class TestEveryExampleRuns:
    def test_every_python_block_is_a_tested_example(self):
        """Every python block of the docs carries an example marker that a test of this module runs."""
        source = Path(__file__).read_text()
        for page in sorted(DOCS.glob("**/*.md")):
            text = page.read_text()
            assert text.count("```python") == len(re.findall(r"<!-- example: [\w-]+ -->\n```python", text)), page
            for name in re.findall(r"<!-- example: ([\w-]+) -->\n```python", text):
                assert f'"{page.name}", "{name}"' in source, (page.name, name)
