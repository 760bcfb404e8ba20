"""Transports: construction, validation, the commands they run, and conformance."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import pytest
from helpers import borg_executable

import vbremote
from vbremote.testing import TransportCheckFailed, check_transport


class TestLocal:
    def test_path_made_absolute(self, tmp_path, monkeypatch):
        """A relative path is resolved when the transport is made, not later."""
        monkeypatch.chdir(tmp_path)
        transport = vbremote.LocalTransport("repo")
        assert transport.path == str(tmp_path / "repo")
        assert transport.serve_command() is None

    def test_empty_path(self):
        """An empty path raises ConfigurationError."""
        with pytest.raises(vbremote.ConfigurationError):
            vbremote.LocalTransport("")

    def test_conformance(self, tmp_path):
        """check_transport passes for a local folder."""
        check_transport(vbremote.LocalTransport(tmp_path / "repo"))


class TestSSH:
    def test_command_line(self):
        """The ssh command carries user, port, key and options, never prompts, and quotes the remote command."""
        transport = vbremote.SSHTransport(
            "backup.example.org", "/srv/borg/vms", user="borg", port=2222,
            identity_file="/keys/id", ssh_options=("Compression=no",), remote_borg="/opt/borg 1.4/borg",
        )
        argv = transport.serve_command()
        assert argv[:5] == ["ssh", "-o", "BatchMode=yes", "-p", "2222"]
        assert argv[5:7] == ["-i", "/keys/id"]
        assert "Compression=no" in argv
        assert argv[-2] == "borg@backup.example.org"
        assert argv[-1] == "'/opt/borg 1.4/borg' serve"

    def test_port_only_when_given(self):
        """Without a port, ssh is not told one: ssh_config's Port line for the host applies."""
        argv = vbremote.SSHTransport("store-alias", "/r").serve_command()
        assert "-p" not in argv
        assert argv == ["ssh", "-o", "BatchMode=yes", "store-alias", "borg serve"]
        assert vbremote.SSHTransport("h", "/r", port=22).serve_command()[3:5] == ["-p", "22"]

    def test_location(self):
        """The location is borg's ssh:// syntax, with relative and home paths marked as borg marks them."""
        assert vbremote.SSHTransport("h", "/abs").location == "ssh://h/abs"
        assert vbremote.SSHTransport("h", "rel", user="u", port=2).location == "ssh://u@h:2/./rel"
        assert vbremote.SSHTransport("h", "~/r").location == "ssh://h/~/r"
        assert vbremote.SSHTransport("::1", "/r").location == "ssh://[::1]/r"
        assert vbremote.SSHTransport("h", "/abs", port=22).location == "ssh://h:22/abs"

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"host": "", "path": "/r"},
            {"host": "-oProxyCommand=x", "path": "/r"},
            {"host": "u@h", "path": "/r"},
            {"host": "h", "path": ""},
            {"host": "h", "path": "/r", "port": 0},
            {"host": "h", "path": "/r", "upload_ratelimit": -1},
        ],
    )
    def test_bad_arguments(self, kwargs):
        """Hosts that ssh would read as options, empty paths and bad ports raise ConfigurationError."""
        with pytest.raises(vbremote.ConfigurationError):
            vbremote.SSHTransport(**kwargs)

    def test_picklable(self):
        """Transports pickle (they travel to the worker process)."""
        transport = vbremote.SSHTransport("h", "/r", user="u", append_only=True)
        assert pickle.loads(pickle.dumps(transport)) == transport


class TestCommand:
    def test_string_command_is_split(self):
        """A command given as a string is split like a shell would."""
        transport = vbremote.CommandTransport("borg serve --append-only", "/r")
        assert transport.serve_command() == ["borg", "serve", "--append-only"]

    def test_empty_command(self):
        """An empty command raises ConfigurationError."""
        with pytest.raises(vbremote.ConfigurationError):
            vbremote.CommandTransport([], "/r")

    def test_conformance_with_borg_serve(self, tmp_path):
        """check_transport passes through a plain 'borg serve' command."""
        check_transport(vbremote.CommandTransport([borg_executable(), "serve"], str(tmp_path / "repo")))

    def test_failing_command(self, tmp_path, base_dir):
        """A command that does not speak borg's protocol raises ConnectionFailed with its words."""
        transport = vbremote.CommandTransport(["sh", "-c", "echo no borg here >&2; exit 3"], str(tmp_path / "r"))
        with pytest.raises(vbremote.ConnectionFailed, match="no borg here"):
            vbremote.Repository.open(transport, passphrase="p", base_dir=base_dir)

    def test_command_started_once_before_the_worker_loads_borg(self, tmp_path, base_dir):
        """The serve command starts once per open, as the worker starts (before it loaded borg), so both overlap."""
        log = tmp_path / "starts"
        # Records, when it starts, whether its parent (the worker) has loaded borg's compiled modules yet.
        wrapper = f'grep -c "borg/compress" /proc/$PPID/maps >> {log}; exec "$@"'
        transport = vbremote.CommandTransport(
            ["sh", "-c", wrapper, "sh", borg_executable(), "serve"], str(tmp_path / "repo")
        )
        vbremote.Repository.init(transport, passphrase="p", base_dir=base_dir).close()
        with vbremote.Repository.open(transport, passphrase="p", base_dir=base_dir) as repo:
            assert repo.archives() == []
        assert log.read_text().split() == ["0", "0"]


@pytest.fixture
def worker_imports_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Put the tests folder on the worker's import path, as a user puts their transport's package."""
    tests = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH", "")) if p))


class InTestModule(vbremote.Transport):
    """A transport class the worker cannot import: this test module is not on its path."""

    def __init__(self, path: str) -> None:
        self._path = path

    @property
    def path(self) -> str:
        return self._path

    @property
    def location(self) -> str:
        return self._path

    def serve_command(self) -> None:
        return None


class TestConformanceCheck:
    def test_catches_a_transport_that_does_not_reach_borg(self, tmp_path, worker_imports_tests):
        """A command that is not borg serve fails the check's first step: ConnectionFailed with the remote's words."""
        from transports_for_tests import NoServeTransport

        with pytest.raises(vbremote.ConnectionFailed, match="no borg here"):
            check_transport(NoServeTransport(str(tmp_path / "r")))

    def test_catches_a_transport_that_breaks_locks(self, tmp_path, worker_imports_tests):
        """A transport whose wrapper removes borg's lock fails the check's lock step, by name."""
        from transports_for_tests import LockBreakingTransport

        with pytest.raises(TransportCheckFailed, match="lock: a second open did not wait"):
            check_transport(LockBreakingTransport(str(tmp_path / "r"), borg_executable()))


class TestImportable:
    def test_class_the_worker_cannot_import(self, tmp_path, base_dir):
        """A transport class the worker process cannot import raises ConfigurationError, not a dead worker."""
        with pytest.raises(vbremote.ConfigurationError, match="importable by module path"):
            vbremote.Repository.init(InTestModule(str(tmp_path / "r")), encryption="none", base_dir=base_dir)
        assert not (tmp_path / "r").exists()

    def test_class_in_main(self, tmp_path, base_dir, monkeypatch):
        """A class defined in __main__ is refused before any worker starts."""
        monkeypatch.setattr(InTestModule, "__module__", "__main__")
        with pytest.raises(vbremote.ConfigurationError, match="defined in __main__"):
            vbremote.Repository.init(InTestModule(str(tmp_path / "r")), encryption="none", base_dir=base_dir)

    def test_class_inside_a_function(self, tmp_path, base_dir):
        """A class defined inside a function is refused before any worker starts."""

        class Local(InTestModule):
            pass

        with pytest.raises(vbremote.ConfigurationError, match="inside a function"):
            vbremote.Repository.open(Local(str(tmp_path / "r")), base_dir=base_dir)

    def test_importable_class_works(self, tmp_path, base_dir, worker_imports_tests):
        """The same kind of class, importable by the worker, opens normally."""
        from transports_for_tests import LockBreakingTransport

        transport = LockBreakingTransport(str(tmp_path / "r"), borg_executable())
        with vbremote.Repository.init(transport, encryption="none", base_dir=base_dir) as repo:
            assert repo.archives() == []


def test_upload_ratelimit_is_honoured(tmp_path, base_dir):
    """upload_ratelimit reaches borg: 3 MiB of new data at 1 MiB/s cannot arrive in under 2 s."""
    transport = vbremote.CommandTransport(
        [borg_executable(), "serve"], str(tmp_path / "repo"), upload_ratelimit=1024
    )
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(3 << 20))
    spec = vbremote.FileSpec(image, "disk.img", vbremote.FileRole.DISK)
    with vbremote.Repository.init(transport, passphrase="p", base_dir=base_dir, compression="none") as repo:
        started = time.monotonic()
        repo.write_archive("a", [spec], vbremote.SnapshotMetadata("vm", "0b8e1c6a-0000-4000-8000-000000000001"))
        # A lower bound only: a slow machine makes this longer, never shorter.
        assert time.monotonic() - started >= 2.0
