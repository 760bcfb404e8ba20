"""The vbremote command end to end: real repositories, the simulated VirtualBox selected by the config."""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from helpers import PASSPHRASE, borg_executable
from test_ssh import sshd  # noqa: F401  (the real sshd on loopback)

import vbremote
from vbremote._cli import EXIT_CODES
from vbremote._snapshotter._lock import vm_lock
from vbremote.testing import MIB, SimulatedVirtualBox

ROOT = Path(__file__).parent.parent
SCHEMAS = ROOT / "vbremote" / "_cli" / "schemas"


def schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / f"{name}.json").read_text())


def validate(document: Any, name: str) -> None:
    jsonschema.validate(document, schema(name), format_checker=jsonschema.FormatChecker())


class CLI:
    """Runs ``python -m vbremote`` in a subprocess with a config file in a temporary folder."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.config = tmp_path / "config.toml"
        self.home = tmp_path / "vbox"
        self.base_dir = tmp_path / "borg-base"
        self.base_dir.mkdir()
        self.state = tmp_path / "state"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BORG_")}
        self.env.update(
            PYTHONPATH=str(ROOT),
            XDG_STATE_HOME=str(self.state),
            XDG_CONFIG_HOME=str(tmp_path / "xdg"),
            VBR_TEST_PASSPHRASE=PASSPHRASE,
            COLUMNS="200",
        )
        self.extra = ""
        self.uuids: dict[str, str] = {}

    def write_config(self, extra: str = "") -> None:
        self.extra = extra
        self.config.write_text(
            f'[repositories.main]\npath = "repo"\npassphrase_env = "VBR_TEST_PASSPHRASE"\n'
            f'borg_base_dir = "borg-base"\n\n'
            f'[virtualbox]\nbackend = "simulated"\nhome = "vbox"\n\n[keep]\nlast = 1\n\n{extra}'
        )

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "vbremote", "--config", str(self.config), *args]

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args), env=self.env, cwd=self.tmp, capture_output=True, text=True,
            stdin=subprocess.DEVNULL, timeout=timeout, check=False,
        )

    def json(self, *args: str, code: int = 0) -> Any:
        done = self("--json", *args)
        assert done.returncode == code, done.stderr
        return json.loads(done.stdout)

    def open(self) -> vbremote.Repository:
        return vbremote.Repository.open(
            vbremote.LocalTransport(self.tmp / "repo"), passphrase=PASSPHRASE, base_dir=self.base_dir
        )

    def vm_files(self, name: str) -> list[vbremote.FileSpec]:
        folder = self.home / "VirtualBox VMs" / name
        return [
            vbremote.FileSpec(folder / f"{name}.vbox", f"{name}.vbox", vbremote.FileRole.SETTINGS),
            vbremote.FileSpec(folder / f"{name}.vdi", f"{name}.vdi", vbremote.FileRole.DISK),
        ]

    def add_archive(self, name: str, vm: str, uuid: str, when: datetime, labels: tuple[str, ...] = ()) -> None:
        meta = vbremote.SnapshotMetadata(vm, uuid, mode=vbremote.SnapshotMode.OFFLINE, labels=frozenset(labels))
        with self.open() as repo:
            repo.write_archive(name, self.vm_files(vm), meta, timestamp=when)


@pytest.fixture
def cli(tmp_path: Path) -> CLI:
    """A config with a local repository (not yet created) and a simulated VirtualBox with VMs alpha and beta."""
    runner = CLI(tmp_path)
    with SimulatedVirtualBox(runner.home, workload=None) as sim:
        for seed, name in enumerate(("alpha", "beta")):
            runner.uuids[name] = sim.create_vm(name, disk_size=4 * MIB, seed=seed)
    runner.write_config()
    return runner


@pytest.fixture
def ready(cli: CLI) -> CLI:
    """The repository created, with two archives of alpha (a day apart) and one of beta."""
    done = cli("init")
    assert done.returncode == 0, done.stderr
    now = datetime.now(UTC)
    cli.add_archive("alpha-1", "alpha", cli.uuids["alpha"], now - timedelta(days=1))
    cli.add_archive("alpha-2", "alpha", cli.uuids["alpha"], now - timedelta(hours=1), labels=("nightly",))
    cli.add_archive("beta-1", "beta", cli.uuids["beta"], now - timedelta(hours=2))
    return cli


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("vbremote: error: ")
    assert "Traceback" not in done.stderr
    return lines[0]


class TestInit:
    def test_init_creates_repository(self, cli):
        """init creates the configured repository; its --json document follows the schema."""
        doc = cli.json("init")
        validate(doc, "init")
        assert doc["repository"] == "main"
        assert doc["encryption"] == "repokey"
        with cli.open() as repo:
            assert repo.id == doc["id"]

    def test_init_twice_is_repository_error(self, cli):
        """A second init fails with exit code 3 and one line saying what is there."""
        assert cli("init").returncode == 0
        done = cli("init")
        assert done.returncode == 3
        assert "already" in one_line_error(done) or "exists" in done.stderr

    def test_init_without_passphrase_source(self, cli):
        """init of an encrypted repository without a passphrase source names the repository table (exit code 2)."""
        cli.config.write_text(cli.config.read_text().replace('passphrase_env = "VBR_TEST_PASSPHRASE"\n', ""))
        done = cli("init")
        assert done.returncode == 2
        assert "repositories.main" in one_line_error(done)
        assert not (cli.tmp / "repo").exists()

    def test_encryption_option(self, cli):
        """--encryption overrides the config's mode."""
        doc = cli.json("init", "--encryption", "authenticated")
        assert doc["encryption"] == "authenticated"


class TestListing:
    def test_vms(self, ready):
        """vms lists the simulated VMs with their state and newest archive, and says it is a test double."""
        doc = ready.json("vms")
        validate(doc, "vms")
        assert doc["virtualbox"]["test_double"] is True
        rows = {row["name"]: row for row in doc["vms"]}
        assert rows["alpha"]["state"] == "PoweredOff"
        assert rows["alpha"]["newest_archive"]["name"] == "alpha-2"
        assert rows["beta"]["newest_archive"]["name"] == "beta-1"
        text = ready("vms").stdout
        assert "SIMULATED" in text
        assert "test double" in text
        assert re.search(r"alpha .*PoweredOff.*alpha-2", text)

    def test_archives(self, ready):
        """archives lists every archive oldest first, or one VM's; --json follows the schema."""
        doc = ready.json("archives")
        validate(doc, "archives")
        assert [a["name"] for a in doc["archives"]] == ["alpha-1", "beta-1", "alpha-2"]
        doc = ready.json("archives", "alpha")
        assert [a["name"] for a in doc["archives"]] == ["alpha-1", "alpha-2"]
        assert doc["archives"][1]["labels"] == ["nightly"]
        assert "alpha-2" in ready("archives").stdout

    def test_names_whole_when_piped(self, ready):
        """Piped without COLUMNS, archive names are printed whole (they are what info and restore take)."""
        long_name = "alpha-" + "x" * 120
        ready.add_archive(long_name, "alpha", ready.uuids["alpha"], datetime.now(UTC))
        del ready.env["COLUMNS"]
        assert long_name in ready("archives").stdout.split()

    def test_json_after_subcommand(self, ready):
        """--json works after the subcommand too."""
        done = ready("archives", "--json")
        assert done.returncode == 0
        validate(json.loads(done.stdout), "archives")

    def test_info(self, ready):
        """info shows an archive's metadata and files; --json follows the schema."""
        doc = ready.json("info", "alpha-2")
        validate(doc, "info")
        assert doc["archive"]["vm_uuid"] == ready.uuids["alpha"]
        roles = {f["path"]: f["role"] for f in doc["archive"]["files"]}
        assert roles == {"alpha.vbox": "settings", "alpha.vdi": "disk"}
        assert "alpha.vdi" in ready("info", "alpha-2").stdout


class TestRepositories:
    def test_repo_option(self, ready, tmp_path):
        """--repo picks a repository by name; an unknown name is a config error listing the known ones (exit 2)."""
        ready.write_config(
            '[repositories.spare]\npath = "spare"\npassphrase_env = "VBR_TEST_PASSPHRASE"\n'
            'borg_base_dir = "borg-base"\n'
        )
        ready.config.write_text('default_repository = "main"\n' + ready.config.read_text())
        assert ready("--repo", "spare", "init").returncode == 0
        assert ready.json("--repo", "spare", "archives")["archives"] == []
        assert len(ready.json("archives")["archives"]) == 3
        done = ready("--repo", "nope", "archives")
        assert done.returncode == 2
        assert "no repository named 'nope' in the config (configured: main, spare)" in one_line_error(done)

    def test_vms_without_repository(self, cli):
        """vms works without any repository configured: no newest archives."""
        cli.config.write_text('[virtualbox]\nbackend = "simulated"\nhome = "vbox"\n')
        doc = cli.json("vms")
        validate(doc, "vms")
        assert doc["repository"] is None
        assert [row["newest_archive"] for row in doc["vms"]] == [None, None]


class TestErrors:
    def test_no_config_file_is_named(self, cli):
        """Without a config file, an unreachable VirtualBox is reported with where the config was looked for."""
        if importlib.util.find_spec("vboxapi") is not None:
            pytest.skip("real VirtualBox is installed here: vms would list its VMs")
        done = subprocess.run(
            [sys.executable, "-m", "vbremote", "vms"], env=cli.env, cwd=cli.tmp, capture_output=True, text=True,
            stdin=subprocess.DEVNULL, timeout=120, check=False,
        )
        assert done.returncode == 4
        line = one_line_error(done)
        assert "no config file was found at" in line
        assert str(cli.tmp / "xdg" / "vbremote" / "config.toml") in line

    def test_unknown_archive(self, ready):
        """A missing archive is one line on stderr, exit code 3, nothing on stdout."""
        done = ready("info", "nope")
        assert done.returncode == 3
        assert "nope" in one_line_error(done)
        assert done.stdout == ""

    def test_verbose_shows_traceback(self, ready):
        """-v adds the traceback before the one line."""
        done = ready("-v", "info", "nope")
        assert done.returncode == 3
        assert "Traceback" in done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("vbremote: error: ")

    def test_json_error_document(self, ready):
        """With --json a failure writes only the error document to stdout, per its schema."""
        doc = ready.json("info", "nope", code=3)
        validate(doc, "error")
        assert doc["error"]["type"] == "ArchiveNotFound"
        assert doc["error"]["exit_code"] == 3

    def test_config_error_names_key(self, cli):
        """A bad config value: exit code 2 and one line naming the key."""
        cli.config.write_text('[repositories.main]\npath = "repo"\npassphrase = "x"\n')
        done = cli("archives")
        assert done.returncode == 2
        assert "repositories.main.passphrase" in one_line_error(done)

    def test_missing_config_file(self, cli):
        """A --config file that does not exist: exit code 2."""
        cli.config.unlink()
        done = cli("archives")
        assert done.returncode == 2
        assert "does not exist" in one_line_error(done)

    def test_wrong_passphrase(self, ready):
        """A wrong passphrase is a repository error: exit code 3."""
        ready.env["VBR_TEST_PASSPHRASE"] = "wrong"
        done = ready("archives")
        assert done.returncode == 3
        one_line_error(done)

    def test_passphrase_env_unset(self, ready):
        """An unset passphrase_env variable is named in the error."""
        del ready.env["VBR_TEST_PASSPHRASE"]
        done = ready("archives")
        assert done.returncode == 3
        assert "VBR_TEST_PASSPHRASE" in one_line_error(done)

    def test_virtualbox_unavailable(self, ready):
        """Without vboxapi, the real backend fails with exit code 4 and what to install."""
        ready.config.write_text(ready.config.read_text().replace('backend = "simulated"\nhome = "vbox"\n', ""))
        done = ready("vms")
        assert done.returncode == 4
        assert "vboxapi" in one_line_error(done)

    def test_usage_error(self, ready):
        """An unknown option is a usage error: exit code 2."""
        assert ready("archives", "--bogus").returncode == 2

    def test_exit_codes_documented(self):
        """The exit-code table of docs/cli.md is the one the command uses."""
        text = (ROOT / "docs" / "cli.md").read_text()
        documented = {name: int(code) for code, name in re.findall(r"^\| (\d+) \| `(\w+)`", text, flags=re.MULTILINE)}
        assert {name: code for name, code, _ in EXIT_CODES} == documented

    def test_log_file(self, ready, tmp_path):
        """--log-file gets the detailed log, stderr stays one line."""
        log = tmp_path / "run.log"
        done = ready("--log-file", str(log), "info", "nope")
        one_line_error(done)
        assert "opening repository main" in log.read_text()


class TestPrune:
    def test_dry_run_changes_nothing(self, ready):
        """prune --dry-run shows the plan (keep last 1) and deletes nothing."""
        doc = ready.json("prune", "alpha", "--dry-run")
        validate(doc, "prune")
        entries = {e["archive"]: e["keep"] for e in doc["vms"][0]["entries"]}
        assert entries == {"alpha-2": True, "alpha-1": False}
        assert doc["vms"][0]["deleted"] == []
        with ready.open() as repo:
            assert len(repo.archives()) == 3
        assert "alpha-1" in ready("prune", "alpha", "--dry-run").stdout

    def test_prune_deletes(self, ready):
        """prune deletes what the rules do not keep, for the VMs named only."""
        doc = ready.json("prune", "alpha")
        validate(doc, "prune")
        assert doc["vms"][0]["deleted"] == ["alpha-1"]
        with ready.open() as repo:
            assert sorted(a.name for a in repo.archives()) == ["alpha-2", "beta-1"]

    def test_all(self, ready):
        """prune --all plans every VM of the repository."""
        doc = ready.json("prune", "--all", "--dry-run")
        assert sorted(v["vm"] for v in doc["vms"]) == ["alpha", "beta"]

    def test_per_vm_rules_and_labels(self, ready):
        """A VM's own keep table and keep_labels from the config decide."""
        ready.write_config('[vms.alpha]\nkeep_labels = ["old"]\n[vms.alpha.keep]\nlast = 2\n')
        doc = ready.json("prune", "alpha", "--dry-run")
        assert all(e["keep"] for e in doc["vms"][0]["entries"])

    def test_guard_refusal_exit_code(self, cli):
        """A guard's refusal (backups stopped: newest archive too old) exits 6, deleting nothing."""
        assert cli("init").returncode == 0
        old = datetime.now(UTC) - timedelta(days=90)
        cli.add_archive("alpha-old-1", "alpha", cli.uuids["alpha"], old - timedelta(days=1))
        cli.add_archive("alpha-old-2", "alpha", cli.uuids["alpha"], old)
        done = cli("prune", "alpha")
        assert done.returncode == 6
        assert "stopped" in done.stderr
        with cli.open() as repo:
            assert len(repo.archives()) == 2

    def test_no_vm_without_terminal(self, ready):
        """Without a VM and without a terminal, prune asks to name one (exit code 2)."""
        done = ready("prune")
        assert done.returncode == 2
        assert "name a VM" in done.stderr

    def test_no_rules(self, ready):
        """Without retention rules in the config, prune names the missing table (exit code 2)."""
        ready.config.write_text(ready.config.read_text().replace("[keep]\nlast = 1\n", ""))
        done = ready("prune", "alpha")
        assert done.returncode == 2
        assert "[keep]" in one_line_error(done)


class TestCheck:
    def test_check_ok(self, ready):
        """check of a sound repository: exit 0; --json per schema."""
        doc = ready.json("check", "--verify-data")
        validate(doc, "check")
        assert doc["ok"] is True

    def test_check_finds_damage(self, ready):
        """check of a damaged repository: exit 1 and the problems listed."""
        segments = sorted((ready.tmp / "repo" / "data").rglob("[0-9]*"), key=lambda p: p.stat().st_size)
        target = segments[-1]
        data = bytearray(target.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(64)
        target.write_bytes(bytes(data))
        done = ready("--json", "check", "--verify-data")
        assert done.returncode == 1
        doc = json.loads(done.stdout)
        validate(doc, "check")
        assert doc["ok"] is False
        assert doc["problems"]


# -- monitoring ------------------------------------------------------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    received: list[tuple[str, str]]

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length).decode()
        self.server.received.append((self.path, body))  # type: ignore[attr-defined]
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def ping_server() -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """A small HTTP server on loopback that records the pings it receives."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.received = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/ping/check-uuid", server.received  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()


def _hook_script(tmp_path: Path, name: str, body: str) -> str:
    script = tmp_path / name
    script.write_text(f"import json, sys, time\n{body}\n")
    return f"[{sys.executable!r}, {str(script)!r}]"


class TestMonitoring:
    def test_ping_start_and_success(self, ready, ping_server):
        """A check sends the start ping, then the success ping, to its URL."""
        url, received = ping_server
        ready.write_config(f'[pings]\ncheck = "{url}"\n')
        assert ready("check").returncode == 0
        assert [path for path, _ in received] == ["/ping/check-uuid/start", "/ping/check-uuid"]

    def test_ping_failure_with_error_text(self, ready, ping_server):
        """A failing check sends the failure ping with the error's text as the body."""
        url, received = ping_server
        ready.write_config(f'[pings]\ncheck = "{url}"\n')
        ready.env["VBR_TEST_PASSPHRASE"] = "wrong"
        assert ready("check").returncode == 3
        assert [path for path, _ in received] == ["/ping/check-uuid/start", "/ping/check-uuid/fail"]
        assert "passphrase" in received[1][1].lower()

    def test_unreachable_ping_reported(self, ready):
        """A ping that cannot be delivered is a warning; the command's result stands."""
        ready.write_config('[pings]\ncheck = "http://127.0.0.1:9/nothing"\ntimeout = 2\n')
        done = ready("--json", "check")
        assert done.returncode == 0
        assert "ping" in done.stderr
        assert "warning" in done.stderr
        validate(json.loads(done.stdout), "check")

    def test_hook_gets_json_document(self, ready, tmp_path):
        """Hooks get each event as a JSON document on stdin, with the result on success; their output goes to stderr."""
        out = tmp_path / "events.jsonl"
        command = _hook_script(
            tmp_path, "hook.py", f"open({str(out)!r}, 'a').write(sys.stdin.read() + '\\n')\nprint('hook says hi')"
        )
        ready.write_config(f"[[hooks]]\ncommand = {command}\non = [\"prune\"]\n")
        done = ready("--json", "prune", "alpha", "--dry-run")
        assert done.returncode == 0
        validate(json.loads(done.stdout), "prune")  # the hook's output went to stderr
        assert "hook says hi" in done.stderr
        events = [json.loads(line) for line in out.read_text().splitlines()]
        assert [e["event"] for e in events] == ["start", "success"]
        assert events[1]["command"] == "prune"
        assert events[1]["repository"] == "main"
        validate(events[1]["result"], "prune")

    def test_failing_hook_reported_result_kept(self, ready, tmp_path):
        """A hook that fails is reported on stderr; exit code and JSON output are the command's."""
        command = _hook_script(tmp_path, "bad.py", "sys.stderr.write('disk full\\n'); sys.exit(3)")
        ready.write_config(f"[[hooks]]\ncommand = {command}\n")
        done = ready("--json", "check")
        assert done.returncode == 0
        assert "failed with exit code 3: disk full" in done.stderr
        validate(json.loads(done.stdout), "check")

    def test_hook_does_not_hide_failure(self, ready, tmp_path):
        """A command that fails keeps its exit code when its failure hook fails too."""
        command = _hook_script(tmp_path, "bad.py", "sys.exit(9)")
        ready.write_config(f"[[hooks]]\ncommand = {command}\n")
        ready.env["VBR_TEST_PASSPHRASE"] = "wrong"
        done = ready("check")
        assert done.returncode == 3
        assert "exit code 9" in done.stderr

    def test_hanging_hook_killed(self, ready, tmp_path):
        """A hook that hangs is killed after its timeout and reported; the command finishes."""
        command = _hook_script(tmp_path, "hang.py", "time.sleep(600)")
        ready.write_config(f"[[hooks]]\ncommand = {command}\nevents = [\"success\"]\ntimeout = 1\n")
        started = time.monotonic()
        done = ready("--json", "check", timeout=60)
        assert time.monotonic() - started < 30
        assert done.returncode == 0
        assert "did not finish within 1 s" in done.stderr
        validate(json.loads(done.stdout), "check")


# -- a real terminal -------------------------------------------------------------


def spawn(cli: CLI, *args: str) -> Any:
    import pexpect

    return pexpect.spawn(
        sys.executable, cli.argv(*args)[1:], env=cli.env, cwd=str(cli.tmp), encoding="utf-8", timeout=30,
        dimensions=(40, 160),
    )


class TestTerminal:
    def test_choose_vm_and_remember(self, ready):
        """At a terminal without a VM: a numbered list, the choice remembered, and with two VMs the other offered."""
        child = spawn(ready, "prune", "--dry-run")
        child.expect(r"Which VM to prune \[1\]: ")
        assert "alpha" in child.before
        assert "beta" in child.before
        child.sendline("2")
        child.expect("beta: plan")
        child.expect(pexpect_eof())
        child.close()
        assert child.exitstatus == 0
        assert json.loads((ready.state / "vbremote" / "cli.json").read_text()) == {"last_vm": "beta"}
        child = spawn(ready, "prune", "--dry-run")
        child.expect(r"Which VM to prune \[1\]: ")
        child.sendline("")
        child.expect("alpha: plan")
        child.expect(pexpect_eof())
        child.close()
        assert child.exitstatus == 0

    def test_out_of_range_asked_again(self, ready):
        """An answer that is not on the list is refused and the question asked again."""
        child = spawn(ready, "prune", "--dry-run")
        child.expect(r"Which VM to prune \[1\]: ")
        child.sendline("7")
        child.expect(r"not in the range")
        child.expect(r"Which VM to prune \[1\]: ")
        child.sendline("1")
        child.expect("alpha: plan")
        child.expect(pexpect_eof())
        child.close()
        assert child.exitstatus == 0


def pexpect_eof() -> Any:
    import pexpect

    return pexpect.EOF


# -- the quickstart --------------------------------------------------------------


def shell_examples(page: str) -> list[tuple[str, str]]:
    text = (ROOT / "docs" / page).read_text()
    return re.findall(r"<!-- example: ([\w-]+) -->\n```sh\n(.*?)```", text, re.S)


class TestQuickstart:
    def test_quickstart_runs_as_printed(self, tmp_path):
        """docs/quickstart.md's shell examples run in order, as printed, in a fresh home folder."""
        home = tmp_path / "home"
        work = tmp_path / "work"
        shims = tmp_path / "bin"
        for folder in (home, work, shims):
            folder.mkdir()
        (shims / "vbremote").write_text(f'#!/bin/sh\nexec {sys.executable} -m vbremote "$@"\n')
        (shims / "python3").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
        for shim in shims.iterdir():
            shim.chmod(0o755)
        env = {
            "HOME": str(home),
            "PATH": f"{shims}:{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT),
            "LANG": "C.UTF-8",
        }
        examples = shell_examples("quickstart.md")
        assert [name for name, _ in examples][:2] == ["quickstart-vm", "quickstart-config"]
        for name, script in examples:
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, capture_output=True, text=True,
                timeout=300, check=False,
            )
            assert done.returncode == 0, f"{name}:\n{done.stdout}\n{done.stderr}"
        assert (home / ".config" / "vbremote" / "config.toml").exists()
        assert (work / "repo").is_dir()


class TestInterrupt:
    def test_ctrl_c_exit_code_and_hook_killed(self, ready, tmp_path):
        """Ctrl-C during a run exits with 130, and a hook still running is killed with it."""
        pid_file = tmp_path / "hook.pid"
        command = _hook_script(
            tmp_path, "slow.py", f"import os\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)"
        )
        ready.write_config(f"[[hooks]]\ncommand = {command}\nevents = [\"start\"]\ntimeout = 100\n")
        process = subprocess.Popen(
            ready.argv("check"), env=ready.env, cwd=ready.tmp, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            deadline = time.monotonic() + 30
            while not (pid_file.exists() and pid_file.read_text()):
                assert time.monotonic() < deadline, "the hook did not start"
                time.sleep(0.05)
            hook_pid = int(pid_file.read_text())
            process.send_signal(signal.SIGINT)
            _, stderr = process.communicate(timeout=30)
        finally:
            process.kill()
        assert process.returncode == 130
        assert "interrupted" in stderr
        with pytest.raises(ProcessLookupError):
            os.kill(hook_pid, 0)


class TestDemo:
    def test_demo(self, tmp_path):
        """vbremote demo runs the demo to the end (needs qemu-img)."""
        from vbremote.testing import qemu_tools_available

        if not qemu_tools_available():
            pytest.skip("qemu-img/qemu-io are not installed (Debian package qemu-utils)")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        done = subprocess.run(
            [sys.executable, "-m", "vbremote", "demo", "--disk-mib", "16", "--keep", str(tmp_path / "demo")],
            env=env, capture_output=True, text=True, timeout=300, check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "pruned" in done.stdout
        # The restore steps: a restore interrupted on purpose resumes from its journal; the VM comes back Saved.
        assert "it resumed (True) from the journal" in done.stdout
        assert "The VM is Saved" in done.stdout
        assert (tmp_path / "demo" / "repository").is_dir()

    def test_demo_has_no_json(self, tmp_path):
        """vbremote demo --json is a usage error: the demo prints prose."""
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        done = subprocess.run(
            [sys.executable, "-m", "vbremote", "--json", "demo"], env=env, capture_output=True, text=True,
            timeout=60, check=False,
        )
        assert done.returncode == 2
        assert done.stdout == ""


class TestServerSidePruning:
    """The server-side pruning recipe through the command: an append-only key on the host, pruning on the server."""

    @pytest.mark.ssh
    def test_append_only_host_and_server_prune(self, sshd, cli, tmp_path):  # noqa: F811
        """Through the forced append-only key prune exits 6 and deletes nothing; the server's local config prunes."""
        repo_path = sshd.forced_root / f"cli-{tmp_path.name}"
        server_base = tmp_path / "server-base"
        server_base.mkdir()
        server_config = tmp_path / "server.toml"
        server_config.write_text(
            f'[repositories.local]\npath = "{repo_path}"\npassphrase_env = "VBR_TEST_PASSPHRASE"\n'
            f'borg_base_dir = "{server_base}"\n\n[keep]\nlast = 1\n'
        )
        assert cli("--config", str(server_config), "init").returncode == 0
        options = ", ".join(f'"{o}"' for o in sshd.options())
        cli.config.write_text(
            f'[repositories.offsite]\ntransport = "ssh"\nhost = "127.0.0.1"\nuser = "{sshd.user}"\n'
            f'port = {sshd.port}\nidentity = "{sshd.forced_key}"\nssh_options = [{options}]\n'
            f'remote_borg = "{borg_executable()}"\npath = "{repo_path}"\nappend_only = true\n'
            f'passphrase_env = "VBR_TEST_PASSPHRASE"\nborg_base_dir = "borg-base"\n\n'
            f'[virtualbox]\nbackend = "simulated"\nhome = "vbox"\n\n[keep]\nlast = 1\n'
        )
        now = datetime.now(UTC)
        meta = vbremote.SnapshotMetadata("alpha", cli.uuids["alpha"])
        transport = vbremote.SSHTransport(
            "127.0.0.1", str(repo_path), user=sshd.user, port=sshd.port, identity_file=sshd.forced_key,
            ssh_options=sshd.options(), remote_borg=borg_executable(),
        )
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=cli.base_dir) as repo:
            for n in range(3):
                repo.write_archive(f"alpha-{n}", cli.vm_files("alpha"), meta, timestamp=now - timedelta(hours=3 - n))
        assert [a["name"] for a in cli.json("archives")["archives"]] == ["alpha-0", "alpha-1", "alpha-2"]
        done = cli("prune", "alpha")
        assert done.returncode == 6
        assert "append-only" in done.stderr
        assert len(cli.json("archives")["archives"]) == 3
        doc = json.loads(cli("--config", str(server_config), "--json", "prune", "--all").stdout)
        assert sorted(doc["vms"][0]["deleted"]) == ["alpha-0", "alpha-1"]
        assert [a["name"] for a in cli.json("archives")["archives"]] == ["alpha-2"]


# -- snapshot ----------------------------------------------------------------------


@pytest.fixture
def created(cli: CLI) -> CLI:
    """The repository created, without archives."""
    done = cli("init")
    assert done.returncode == 0, done.stderr
    return cli


class TestSnapshot:
    def test_snapshot(self, created):
        """snapshot archives a VM with the config's labels and --label; --json follows the schema."""
        created.write_config('[vms.alpha]\nlabels = ["nightly"]\n')
        doc = created.json("snapshot", "alpha", "--label", "before-upgrade")
        validate(doc, "snapshot")
        (taken,) = doc["snapshots"]
        assert taken["vm"] == "alpha"
        assert taken["mode"] == "offline"
        assert taken["vm_state"] == "PoweredOff"
        assert taken["archive"]["labels"] == ["before-upgrade", "nightly"]
        with created.open() as repo:
            (archive,) = repo.archives("alpha")
        assert archive.name == taken["archive"]["name"]
        assert archive.metadata.labels == {"nightly", "before-upgrade"}

    def test_several_vms_and_text(self, created):
        """snapshot takes each VM named, in turn, and says what each cost."""
        done = created("snapshot", "alpha", "beta")
        assert done.returncode == 0, done.stderr
        assert re.search(r"^alpha: alpha-\S+ \(offline\); read ", done.stdout, re.M)
        assert re.search(r"^beta: beta-\S+ \(offline\); read ", done.stdout, re.M)
        assert [row["newest_archive"] is not None for row in created.json("vms")["vms"]] == [True, True]

    def test_mode_from_config(self, created):
        """The VM's mode in the config applies: online on a powered-off VM is refused (exit code 4)."""
        created.write_config('[vms.alpha]\nmode = "online"\n')
        done = created("snapshot", "alpha")
        assert done.returncode == 4
        one_line_error(done)
        assert created("snapshot", "alpha", "--mode", "offline").returncode == 0

    def test_unknown_vm(self, created):
        """An unknown VM is a VirtualBox error, exit code 4, and nothing is written."""
        done = created("snapshot", "gamma")
        assert done.returncode == 4
        assert "gamma" in one_line_error(done)
        with created.open() as repo:
            assert repo.archives() == []

    def test_snapshot_in_progress_exit_code(self, created):
        """While another run holds the VM's lock, snapshot fails with exit code 5 (a snapshot error)."""
        from vbremote._snapshotter._lock import vm_lock

        with vm_lock(created.state / "vbremote", created.uuids["alpha"], vm="alpha"):
            done = created("snapshot", "alpha")
        assert done.returncode == 5
        one_line_error(done)

    def test_no_progress_bars_when_piped(self, created):
        """Piped (stderr not a terminal): no progress bars anywhere."""
        done = created("snapshot", "alpha")
        assert done.returncode == 0
        assert "━" not in done.stderr + done.stdout
        assert "MiB/" not in done.stderr

    def test_progress_bars_and_choice_in_terminal(self, created):
        """At a terminal: choose the VM from the list, then progress bars (phase, bytes, rate) on the terminal."""
        child = spawn(created, "snapshot")
        child.expect(r"Which VM to snapshot \[1\]: ")
        assert "PoweredOff" in child.before
        child.sendline("2")
        child.expect(pexpect_eof())
        child.close()
        assert child.exitstatus == 0, child.before
        output = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", child.before)
        assert re.search(r"archive beta\.vdi .*━.* [\d.]+/[\d.]+ MiB", output)
        assert "merge beta" in output
        assert re.search(r"^beta: beta-\S+ \(offline\)", output, re.M)

    def test_no_progress_bars_with_json_in_terminal(self, created):
        """With --json at a terminal: no bars, only the JSON document."""
        child = spawn(created, "--json", "snapshot", "alpha")
        child.expect(pexpect_eof())
        child.close()
        assert child.exitstatus == 0
        assert "━" not in child.before
        validate(json.loads(child.before), "snapshot")


# -- restore and drill -----------------------------------------------------------


def disk(cli: CLI, vm: str) -> bytes:
    with SimulatedVirtualBox(cli.home, workload=None) as sim:
        return sim.disk_content(vm)


def scribble(cli: CLI, vm: str, fill: bytes = b"\xa5") -> None:
    """Change 1 MiB of the VM's disk, as its guest would."""
    from vbremote.testing._vdi import VDI

    VDI.open(cli.home / "VirtualBox VMs" / vm / f"{vm}.vdi").write(MIB, fill * MIB)


@pytest.fixture
def snapped(created: CLI) -> CLI:
    """alpha snapshotted once, then its disk changed."""
    assert created("snapshot", "alpha").returncode == 0
    created.archived = disk(created, "alpha")
    scribble(created, "alpha")
    assert disk(created, "alpha") != created.archived
    return created


class TestRestore:
    def test_restore_newest(self, snapped):
        """restore VM --yes restores its newest archive in place; only the changed block travels."""
        assert snapped("snapshot", "alpha").returncode == 0
        newest = disk(snapped, "alpha")
        scribble(snapped, "alpha", fill=b"\x5a")
        doc = snapped.json("restore", "alpha", "--yes")
        validate(doc, "restore")
        assert doc["vm"]["name"] == "alpha"
        assert doc["plan"]["bytes_to_fetch"] <= 2 * MIB
        assert doc["plan"]["bytes_reused"] > 0
        assert disk(snapped, "alpha") == newest

    def test_verify_and_portability_options(self, snapped):
        """--verify full reads back every block (none: no read-back); --cpu-portability-level reaches the VM."""
        scribble(snapped, "alpha", fill=b"\x5a")
        full = snapped.json("restore", "alpha", "--yes", "--verify", "full", "--cpu-portability-level", "2")
        validate(full, "restore")
        size = full["plan"]["bytes_reused"] + full["plan"]["bytes_to_write"]
        assert full["stats"]["bytes_verified"] >= size > full["stats"]["bytes_written"]
        with SimulatedVirtualBox(snapped.home, workload=None) as sim:
            machine = sim.manager().getVirtualBox().findMachine("alpha")
            assert machine.CPUIDPortabilityLevel == 2
        scribble(snapped, "alpha", fill=b"\x5b")
        none = snapped.json("restore", "alpha", "--yes", "--verify", "none")
        assert none["stats"]["bytes_verified"] == 0
        assert disk(snapped, "alpha") == snapped.archived
        assert snapped("restore", "alpha", "--yes", "--cpu-portability-level", "4").returncode == 2

    def test_plan_shown_and_no_write_without_yes(self, snapped):
        """Without --yes and without a terminal, the plan is shown, nothing is written, exit code 2."""
        done = snapped("restore", "alpha")
        assert done.returncode == 2
        assert "restore plan" in done.stdout
        assert "--yes" in done.stderr
        assert disk(snapped, "alpha") != snapped.archived

    def test_refused_plan(self, snapped):
        """A plan with problems (the new name is taken) is refused before any question: remedy shown, exit code 5."""
        done = snapped("restore", "alpha", "--as-new", "beta")
        assert done.returncode == 5
        assert "name-taken" in done.stdout
        assert "choose another name" in done.stdout
        assert "name-taken" in one_line_error(done)

    def test_missing_image_refused_then_ejected(self, created):
        """A DVD image gone since the snapshot: refused with the image-missing problem (exit code 5, nothing
        written); --eject-missing-images restores with the drive empty and lists it."""
        iso = created.tmp / "isos" / "install.iso"
        iso.parent.mkdir()
        iso.write_bytes(b"iso" * 1000)
        with SimulatedVirtualBox(created.home, workload=None) as sim:
            sim.insert_image("alpha", iso)
        assert created("snapshot", "alpha").returncode == 0
        archived = disk(created, "alpha")
        scribble(created, "alpha")
        iso.unlink()
        done = created("restore", "alpha", "--yes")
        assert done.returncode == 5
        assert "image-missing" in one_line_error(done)
        assert str(iso) in done.stdout
        assert "--eject-missing-images" in done.stdout
        assert disk(created, "alpha") != archived
        doc = created.json("restore", "alpha", "--yes", "--eject-missing-images")
        validate(doc, "restore")
        assert doc["vm"]["state"] == "PoweredOff"
        assert doc["plan"]["problems"] == []
        assert [(d["image"], d["kind"], d["snapshot"]) for d in doc["ejected"]] == [(str(iso), "DVD", None)]
        assert doc["plan"]["ejected"] == doc["ejected"]
        assert disk(created, "alpha") == archived

    def test_locked_by_snapshot_run(self, snapped):
        """restore takes the VM's lock in the configured state folder: while a snapshot run holds it, exit code 5
        and nothing is written."""
        snapped.config.write_text('state_dir = "state-here"\n' + snapped.config.read_text())
        with SimulatedVirtualBox(snapped.home, workload=None) as sim:
            uuid = sim.manager().getVirtualBox().findMachine("alpha").id
        with vm_lock(snapped.tmp / "state-here", uuid):
            done = snapped("restore", "alpha", "--yes")
        assert done.returncode == 5, done.stderr
        assert "holds the lock" in one_line_error(done)
        assert disk(snapped, "alpha") != snapped.archived

    def test_as_new(self, snapped):
        """--as-new registers the archive as a second VM beside the current one."""
        doc = snapped.json("restore", "alpha", "--as-new", "alpha-old", "--yes")
        assert doc["vm"]["name"] == "alpha-old"
        assert disk(snapped, "alpha-old") == snapped.archived
        assert disk(snapped, "alpha") != snapped.archived

    def test_terminal_choice_and_confirmation(self, snapped):
        """At a terminal: choose VM and archive (newest offered), see the plan; "n" writes nothing, "y" restores."""
        assert snapped("snapshot", "beta").returncode == 0
        assert snapped("snapshot", "alpha").returncode == 0
        newest = disk(snapped, "alpha")
        scribble(snapped, "alpha", fill=b"\x5a")
        changed = disk(snapped, "alpha")
        for answer, code in (("n", 130), ("y", 0)):
            child = spawn(snapped, "restore")
            child.expect(r"Which VM to restore \[\d\]: ")
            child.sendline("1")
            child.expect(r"Which archive \[1\]: ")
            child.sendline("")
            child.expect("restore plan")
            child.expect(r"Restore alpha-\S+ into .*\? \[y/N\]: ")
            child.sendline(answer)
            child.expect(pexpect_eof())
            child.close()
            assert child.exitstatus == code
            assert disk(snapped, "alpha") == (changed if answer == "n" else newest)


    def test_host_references(self, created):
        """An archive whose settings share a host folder is refused with the option named; with it, it restores."""
        from vbremote.testing._vdi import VDI

        source = created.tmp / "crafted"
        source.mkdir()
        VDI.create(source / "dev.vdi", MIB, image_uuid="aaaaaaaa-2222-3333-4444-555555555555")
        (source / "dev.vbox").write_text(
            '<?xml version="1.0"?>\n<VirtualBox xmlns="http://www.virtualbox.org/" version="1.19-linux">'
            '<Machine uuid="{11111111-2222-3333-4444-555555555555}" name="dev" OSType="Other">'
            '<MediaRegistry><HardDisks><HardDisk uuid="{aaaaaaaa-2222-3333-4444-555555555555}" location="dev.vdi"'
            ' format="VDI" type="Normal"/></HardDisks></MediaRegistry><Hardware><CPU count="1"/>'
            '<SharedFolders><SharedFolder name="home" hostPath="/home" writable="true"/></SharedFolders></Hardware>'
            '<StorageControllers><StorageController name="SATA" type="AHCI" PortCount="1">'
            '<AttachedDevice type="HardDisk" port="0" device="0"><Image uuid="{aaaaaaaa-2222-3333-4444-555555555555}"/>'
            '</AttachedDevice></StorageController></StorageControllers></Machine></VirtualBox>\n')
        metadata = vbremote.SnapshotMetadata(vm_name="dev", vm_uuid="11111111-2222-3333-4444-555555555555")
        with created.open() as repo:
            repo.write_archive("crafted", [
                vbremote.FileSpec(source / "dev.vbox", "dev.vbox", vbremote.FileRole.SETTINGS),
                vbremote.FileSpec(source / "dev.vdi", "dev.vdi", vbremote.FileRole.DISK),
            ], metadata)
        target = str(created.tmp / "restored")
        done = created("restore", "crafted", "--target", target, "--yes")
        assert done.returncode == 5
        assert "host-reference" in done.stdout
        assert "--allow-host-references" in done.stdout
        assert not (created.tmp / "restored").exists()
        doc = created.json("restore", "crafted", "--target", target, "--yes", "--allow-host-references")
        validate(doc, "restore")
        assert doc["vm"]["name"] == "dev"
        assert 'hostPath="/home"' in (created.tmp / "restored" / "dev.vbox").read_text()


class TestDrill:
    def test_drill(self, snapped):
        """drill restores the newest archive as a scratch VM, runs it, verifies it and removes it."""
        doc = snapped.json("drill", "alpha", "--run-seconds", "1")
        validate(doc, "drill")
        assert doc["ok"] is True
        assert [s["step"] for s in doc["steps"]] == ["restore", "start", "run", "power off", "remove"]
        assert all(s["ok"] for s in doc["steps"])
        names = [row["name"] for row in snapped.json("vms")["vms"]]
        assert names == ["alpha", "beta"]
        assert not (snapped.home / "VirtualBox VMs" / doc["scratch_vm"]).exists()

    def test_failed_drill_names_step(self, snapped):
        """A drill over a damaged repository fails at the restore step, says so, and leaves no scratch VM."""
        segments = sorted((snapped.tmp / "repo" / "data").rglob("[0-9]*"), key=lambda p: p.stat().st_size)
        data = bytearray(segments[-1].read_bytes())
        middle = len(data) // 2
        data[middle : middle + 4096] = bytes(4096)
        segments[-1].write_bytes(bytes(data))
        done = snapped("--json", "drill", "alpha", "--run-seconds", "1")
        assert done.returncode == 3
        doc = json.loads(done.stdout)
        validate(doc, "drill")
        assert doc["ok"] is False
        assert doc["failed_step"] == "restore"
        assert "failed at step 'restore'" in done.stderr
        assert [row["name"] for row in snapped.json("vms")["vms"]] == ["alpha", "beta"]
