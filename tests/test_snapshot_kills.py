"""Snapshot runs killed with SIGKILL at 20 random points each, on every VirtualBox profile.

A crash of vbremote is not a crash of VirtualBox: VBoxSVC and the VM process
run apart from the process that takes snapshots, so the guest runs on, an
operation VBoxSVC started (a take, a delete) runs to its end, and VBoxSVC's
client watcher ends the dead client's sessions (``VirtualBox::ClientWatcher::worker``
and ``SessionMachine::i_checkForDeath``, src/VBox/Main/src-server/
ClientWatcher.cpp and MachineImpl.cpp, 7.1 tree). The test keeps that shape:
the simulated host lives in the test process and serves its vboxapi surface
over a Unix socket (:class:`SimServer`); every run is a process of its own,
forked from a helper process (so a run costs no interpreter start), that
drives the host through a proxy manager (:class:`RemoteManager`) and writes
to a real borg repository through its own borg worker.

Each run removes the previous run's leftover in its first take, which must
succeed, and its second take is killed at a point chosen per phase (locking,
leftovers, snapshot, archive, checkpoint, commit, merge; a leftovers point
kills the first take while it deletes the leftover) plus a random delay of up
to 20 ms. The run's process group and its borg worker (which vbremote starts
in a session of its own) are killed together, in a random order: a crash of
the whole run. The profiles run side by side, each with its own host,
repository and processes; the seed is printed with any failure
(``VBREMOTE_KILL_SEED`` repeats it).

After each kill: ``borg check`` is clean (borg's own command line, forked
from a process that imported it: :class:`BorgForks`), the VM is Running and
its guest still writes, its disks read what the guest wrote, the settings
file on disk describes the live snapshot tree, and at most one transient
snapshot is left, which the next run removes and reports. At the end no
checkpoint is left and every archive's disks are, bit for bit, what the
guest had at its instant.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

import pytest
from helpers import PASSPHRASE, BorgCLI

import vbremote
from vbremote._settings import parse_settings
from vbremote.testing import MIB, VIRTUALBOX_PROFILES, GuestWorkload, SimulatedVBoxError, SimulatedVirtualBox, Timing
from vbremote.testing._vbox import _media
from vbremote.testing._vbox._com import VirtualBoxManager, _Constants, _Statuses
from vbremote.testing._vbox._constants import constants_for
from vbremote.testing._vdi import VDI

KILLS = 20
PHASES = ("locking", "leftovers", "snapshot", "archive", "checkpoint", "commit", "merge")
# How many events of a phase a kill point may wait for (the point is one of the first few).
_EVENTS = {"locking": 2, "leftovers": 1, "snapshot": 2, "archive": 4, "checkpoint": 2, "commit": 1, "merge": 2}
_TIMEOUT = 60.0
_SCALARS = (type(None), bool, int, float, str, bytes)
_METHOD = object()


# -- the host in this process, served over a socket -----------------------------------------------------


class SimServer:
    """Serves a simulated host's vboxapi manager to client processes, one thread per connection.

    A client's first message names its kind: ``"vbox"`` connections are
    served (calls and attribute reads on the manager and the objects it hands
    out); ``"events"`` connections are queued for the test to read. When a
    vbox client goes away, the sessions it opened and left locked are
    unlocked, as VBoxSVC does for a dead client.
    """

    def __init__(self, sim: SimulatedVirtualBox, path: Path) -> None:
        self.sim = sim
        self.path = path
        self.listener = Listener(str(path), family="AF_UNIX")
        self.events: list[Connection] = []
        self.requests = 0
        self.arrived = threading.Condition()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="sim-server").start()

    def close(self) -> None:
        self._closed = True
        self.listener.close()

    def next_events(self, timeout: float) -> Connection:
        with self.arrived:
            if not self.arrived.wait_for(lambda: bool(self.events), timeout):
                raise AssertionError(f"no run connected within {timeout} s")
            return self.events.pop(0)

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn = self.listener.accept()
                kind = conn.recv()
            except (OSError, EOFError):
                continue
            if kind == "events":
                with self.arrived:
                    self.events.append(conn)
                    self.arrived.notify_all()
            else:
                threading.Thread(target=self._serve, args=(conn,), daemon=True, name="sim-client").start()

    def _serve(self, conn: Connection) -> None:
        manager = self.sim.manager()
        objects: dict[int, Any] = {0: manager}
        sessions: list[Any] = []
        counter = itertools.count(1)

        def encode(value: Any) -> Any:
            if isinstance(value, _SCALARS):
                return value
            if isinstance(value, list | tuple):
                return (type(value).__name__, [encode(v) for v in value])
            handle = next(counter)
            objects[handle] = value
            return ("@", handle, type(value).__name__)

        def decode(value: Any) -> Any:
            if isinstance(value, tuple) and value and value[0] == "@":
                return objects[value[1]]
            if isinstance(value, tuple) and value and value[0] in ("list", "tuple"):
                items = [decode(v) for v in value[1]]
                return items if value[0] == "list" else tuple(items)
            return value

        try:
            while True:
                try:
                    handle, op, name, args = conn.recv()
                except (EOFError, OSError):
                    return
                self.requests += 1
                try:
                    target = objects[handle]
                    values = [decode(a) for a in args]
                    if op == "get":
                        result = getattr(target, name)
                        if callable(result) and not isinstance(result, type) and not hasattr(result, "_identity"):
                            conn.send(("method",))  # called through "call" with the name
                            continue
                    elif op == "set":
                        setattr(target, name, values[0])
                        result = None
                    elif op == "call":
                        result = (getattr(target, name) if name else target)(*values)
                        if type(result).__name__ == "_ISession":
                            sessions.append(result)
                    elif op == "eq":
                        result = target == values[0]
                    else:
                        raise ValueError(f"unknown operation {op!r}")
                    reply: tuple[Any, ...] = ("ok", encode(result))
                except SimulatedVBoxError as exc:
                    reply = ("vbox", exc.errno, exc.msg)
                except Exception as exc:
                    kind = type(exc) if type(exc) in (AttributeError, TypeError, ValueError, KeyError) else RuntimeError
                    reply = ("error", kind.__name__, f"{type(exc).__name__}: {exc}")
                try:
                    conn.send(reply)
                except OSError:
                    return
        finally:
            # VBoxSVC's client watcher: a dead client's sessions end.
            locked = manager.constants.SessionState_Locked
            for session in sessions:
                try:
                    if session.state == locked:
                        session.unlockMachine()
                except SimulatedVBoxError:
                    pass
            conn.close()


class _Remote:
    """A proxy of one object of the served host (its methods are remembered per class: one request a call)."""

    def __init__(self, client: _VBoxClient, handle: int, kind: str) -> None:
        object.__setattr__(self, "_client", client)
        object.__setattr__(self, "_handle", handle)
        object.__setattr__(self, "_kind", kind)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if (self._kind, name) not in self._client.methods:
            value = self._client.request(self._handle, "get", name, ())
            if value is not _METHOD:
                return value
            self._client.methods.add((self._kind, name))
        return lambda *args: self._client.request(self._handle, "call", name, args)

    def __setattr__(self, name: str, value: Any) -> None:
        self._client.request(self._handle, "set", name, (value,))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Remote):
            return False
        return other._handle == self._handle or bool(self._client.request(self._handle, "eq", "", (other,)))

    def __hash__(self) -> int:
        return hash(self._kind)  # equal proxies (one object, two handles) are of one class


class _VBoxClient:
    """One connection to a :class:`SimServer`; requests are serialised."""

    def __init__(self, path: str) -> None:
        self.conn = Client(path, family="AF_UNIX")
        self.conn.send("vbox")
        self.lock = threading.Lock()
        self.methods: set[tuple[str, str]] = set()

    def encode(self, value: Any) -> Any:
        if isinstance(value, _Remote):
            return ("@", value._handle)
        if isinstance(value, list | tuple):
            return (type(value).__name__, [self.encode(v) for v in value])
        return value

    def decode(self, value: Any) -> Any:
        if isinstance(value, tuple) and value and value[0] == "@":
            return _Remote(self, value[1], value[2])
        if isinstance(value, tuple) and value and value[0] in ("list", "tuple"):
            items = [self.decode(v) for v in value[1]]
            return items if value[0] == "list" else tuple(items)
        return value

    def request(self, handle: int, op: str, name: str, args: tuple[Any, ...]) -> Any:
        with self.lock:
            self.conn.send((handle, op, name, [self.encode(a) for a in args]))
            reply = self.conn.recv()
        if reply[0] == "ok":
            return self.decode(reply[1])
        if reply[0] == "method":
            return _METHOD
        if reply[0] == "vbox":
            raise SimulatedVBoxError(reply[1], reply[2])
        kind = {"AttributeError": AttributeError, "TypeError": TypeError, "ValueError": ValueError,
                "KeyError": KeyError}.get(reply[1], RuntimeError)
        raise kind(reply[2])


class RemoteManager(VirtualBoxManager):
    """The served host's manager, as a client process sees it (the ``xcpt*`` helpers and constants are local)."""

    def __init__(self, path: str, profile: str) -> None:
        self._client = _VBoxClient(path)
        self._root = _Remote(self._client, 0, "VirtualBoxManager")
        self.style = self.type = "XPCOM"
        self.remote = False
        self.constants = _Constants(constants_for(profile))
        self.statuses = _Statuses()
        self.oXcptClass = SimulatedVBoxError
        self.vbox = self._root.getVirtualBox()

    def getVirtualBox(self) -> Any:
        return self.vbox

    def getSessionObject(self, oIVBox: object = None) -> Any:
        return self._root.getSessionObject()

    def getArray(self, oInterface: object, sAttrib: str) -> list[Any]:
        return list(self._root.getArray(oInterface, sAttrib))

    def getBinDir(self) -> str:
        return str(self._root.getBinDir())


# -- the runs: forked from a helper process -------------------------------------------------------------


class _Watch:
    """A run's progress callback: counts the events per phase and reports reaching the kill point.

    ``commit`` is the last file's final ``archive`` event (the archive is
    committed next); ``files`` is how many files the run's previous take had.
    A point whose phase has fewer events fires at the first event after it.
    """

    def __init__(self, events: Connection, point: dict[str, Any] | None, take: int, files: int) -> None:
        self.events = events
        self.point = point
        self.take = take
        self.files = files
        self.seen: dict[str, int] = {}

    def __call__(self, event: vbremote.Progress) -> None:
        phase = event.operation
        if phase == "archive" and event.done == event.total:
            self.seen["files"] = self.seen.get("files", 0) + 1
            if self.seen["files"] == self.files:
                phase = "commit"
        self.seen[phase] = self.seen.get(phase, 0) + 1
        if self.point is None:
            return
        wanted = PHASES.index(self.point["phase"])
        here = PHASES.index(phase) if phase in PHASES else -1
        if here > wanted or (here == wanted and self.seen[phase] >= self.point["event"]):
            self.point = None
            self.events.send(("point", self.take, phase, self.seen[phase]))


def _run(spec: dict[str, Any]) -> None:
    """One run process: takes snapshots in a loop; reports its events; the test kills it at its point."""
    events = Client(spec["socket"], family="AF_UNIX")
    events.send("events")
    try:
        host = vbremote.VirtualBoxHost.connect(manager=RemoteManager(spec["socket"], spec["profile"]))
        repo = vbremote.Repository.open(vbremote.LocalTransport(spec["repo"]), passphrase=PASSPHRASE,
                                        base_dir=Path(spec["base_dir"]))
        events.send(("worker", repo._worker._process.pid))
        snapshotter = vbremote.Snapshotter(host, repo, state_dir=Path(spec["state_dir"]),
                                           name_template="{vm}-{run}-{mode}", checkpoint_interval=0.02)
        point = spec["point"]
        files = 0
        for take in itertools.count(1):
            progress = _Watch(events, point if point and point["take"] == take else None, take, files)
            result = snapshotter.take("dev", progress=progress)
            files = progress.seen.get("files", 0)
            events.send(("result", take, result.archive.name, sorted(s.uuid for s in result.leftovers),
                         result.mode.value))
            if point is None:
                repo.close()
                events.send(("done",))
                return
    except BaseException:
        events.send(("error", traceback.format_exc()))
        raise


def _zygote() -> None:
    """The helper process: forks a run per request line (a run needs no interpreter start).

    It is the subreaper of its runs' process trees, so a killed run's borg
    worker is reaped (a zombie would still hold borg's repository lock); it
    reports a run's end once every process of the run is gone.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    for line in sys.stdin:
        spec = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os.setpgid(0, 0)
            os.dup2(2, 1)
            code = 0
            try:
                _run(spec)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        print("pid", pid, flush=True)
        status = None
        while True:
            try:
                done, raw = os.wait()
            except ChildProcessError:
                break
            if done == pid:
                status = raw
        print("exit", os.waitstatus_to_exitcode(status) if status is not None else "?", flush=True)


def _borg_zygote() -> None:
    """The borg command line for the test: each request forks a process that runs borg's entry point.

    ``borg.archiver.main`` is what the ``borg`` executable runs; forked from
    a process that imported it once, a ``borg check`` costs no interpreter
    start. A request is ``[args, env, output file]``; the answer is the exit code.
    """
    from borg.archiver import main

    for line in sys.stdin:
        args, env, output = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 2
            try:
                fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.environ.clear()
                os.environ.update(env)
                sys.argv = ["borg", *args]
                code = main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 2
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code or 0)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)


class BorgForks:
    """Runs borg commands through :func:`_borg_zygote`."""

    def __init__(self, borg: BorgCLI, folder: Path) -> None:
        self.borg = borg
        self.output = folder / "borg.out"
        self.process = subprocess.Popen([sys.executable, __file__, "--borg"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=borg.env(), text=True, bufsize=1)

    def __call__(self, *args: str) -> str:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(json.dumps([list(args), self.borg.env(), str(self.output)]) + "\n")
        self.process.stdin.flush()
        code = self.process.stdout.readline().strip()
        text = self.output.read_text(errors="replace")
        if code != "0":
            raise AssertionError(f"borg {' '.join(args)} exited {code or 'without an answer'}:\n{text}")
        return text

    def close(self) -> None:
        for stream in (self.process.stdin, self.process.stdout):
            if stream:
                stream.close()
        self.process.wait(30)


# -- the test's side ------------------------------------------------------------------------------------


class _Instants(dict[str, Any]):
    """The simulator's snapshot instants, each also copied out when it is recorded, kept after the snapshot goes.

    The simulator records an instant copy-on-write and forgets it with its
    snapshot; the disks here are small, so the test keeps each instant's
    content (read at the instant, under the simulator's disk lock) by uuid.
    """

    def __init__(self, machine: Any, kept: dict[str, dict[Any, bytes]]) -> None:
        super().__init__()
        self._machine = machine
        self._kept = kept

    def __setitem__(self, uuid: str, disks: Any) -> None:
        super().__setitem__(uuid, disks)
        self._kept[uuid] = {where: _media.content_at(self._machine, instant, where) for where, instant in disks.items()}


class _Snapshots(dict[str, Any]):
    """The simulator's snapshots of a machine, each snapshot's name also kept (by uuid) after it goes."""

    def __init__(self, names: dict[str, str]) -> None:
        super().__init__()
        self._names = names

    def __setitem__(self, uuid: str, snapshot: Any) -> None:
        super().__setitem__(uuid, snapshot)
        self._names[snapshot.name] = uuid


class KillRun:
    """One profile's 20 kills: the host, the repository, the helper process and the checks."""

    def __init__(self, profile: str, tmp_path: Path, seed: int) -> None:
        self.profile = profile
        self.tmp_path = tmp_path
        self.rng = random.Random(seed)
        self.seed = seed
        self.log: list[str] = []
        self.sim = SimulatedVirtualBox(tmp_path / "vbox", version=profile,
                                       timing=Timing(snapshot=0.01, unlock_delay=0.01, merge_block=0.0))
        self.sim.create_vm("dev", disk_size=2 * MIB, disks=2, firmware="EFI", memory_mb=64,
                           external_disk_folder=tmp_path / "elsewhere")
        self.instants: dict[str, dict[Any, bytes]] = {}
        self.snapshot_uuids: dict[str, str] = {}
        machine = self.sim.machine("dev")
        machine.instants = _Instants(machine, self.instants)
        machine.snapshots = _Snapshots(self.snapshot_uuids)
        self.sim.start("dev", workload=GuestWorkload(rate=200, write_size=16 * 1024, pattern="hot", seed=seed))
        self.host = vbremote.VirtualBoxHost.connect(manager=self.sim.manager())
        self.base_dir = tmp_path / "borg-base"
        self.base_dir.mkdir()
        self.borg = BorgForks(BorgCLI(self.base_dir), tmp_path)
        self.transport = vbremote.LocalTransport(tmp_path / "repo")
        vbremote.Repository.init(self.transport, passphrase=PASSPHRASE, base_dir=self.base_dir).close()
        self.server = SimServer(self.sim, tmp_path / "vbox.sock")
        self.stderr = (tmp_path / "runs.log").open("w+b")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), str(Path(vbremote.__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
        self.zygote = subprocess.Popen([sys.executable, __file__, "--zygote"], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=self.stderr, env=env, text=True, bufsize=1)
        self.answers: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._read_zygote, daemon=True, name="kill-helper-answers")
        self.reader.start()
        self.results: list[tuple[str, list[str]]] = []
        self.live: tuple[int, int] | None = None

    def close(self) -> None:
        if self.live is not None:  # a check failed with a run still going
            pid, worker = self.live
            for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(worker, signal.SIGKILL)):
                with contextlib.suppress(ProcessLookupError):
                    kill()
        if self.zygote.stdin:
            self.zygote.stdin.close()
        try:
            self.zygote.wait(30)
        except subprocess.TimeoutExpired:
            self.zygote.kill()
            self.zygote.wait()
        self.reader.join(30)  # it ends at the helper's end of output
        if self.zygote.stdout:
            self.zygote.stdout.close()
        self.borg.close()
        self.server.close()
        self.sim.close()
        self.stderr.close()

    def failure(self, what: str) -> str:
        self.stderr.seek(0)
        runs = self.stderr.read().decode(errors="replace")[-4000:]
        return f"{what}\nprofile {self.profile}, seed {self.seed}\n" + "\n".join(self.log) + f"\n--- runs:\n{runs}"

    def _read_zygote(self) -> None:
        assert self.zygote.stdout is not None
        for line in self.zygote.stdout:
            self.answers.put(line)
        self.answers.put("")

    def _zygote_line(self) -> list[str]:
        try:
            line = self.answers.get(timeout=_TIMEOUT)
        except queue.Empty:
            line = ""
        assert line, self.failure("the helper process did not answer")
        return line.split()

    def _start(self, point: dict[str, Any] | None) -> tuple[int, Connection, int]:
        spec = {"socket": str(self.server.path), "profile": self.profile, "repo": self.transport.path,
                "base_dir": str(self.base_dir), "state_dir": str(self.tmp_path / "state"), "point": point}
        assert self.zygote.stdin is not None
        self.zygote.stdin.write(json.dumps(spec) + "\n")
        self.zygote.stdin.flush()
        kind, pid = self._zygote_line()
        assert kind == "pid"
        events = self.server.next_events(_TIMEOUT)
        message = self._recv(events)
        assert message[0] == "worker", self.failure(f"run did not start: {message}")
        self.live = (int(pid), int(message[1]))
        return int(pid), events, int(message[1])

    def _recv(self, events: Connection) -> tuple[Any, ...]:
        if not events.poll(_TIMEOUT):
            raise AssertionError(self.failure("no event from the run"))
        message: tuple[Any, ...] = events.recv()
        if message[0] == "error":
            raise AssertionError(self.failure(f"the run failed:\n{message[1]}"))
        return message

    def _result(self, message: tuple[Any, ...], expected: set[str] | None) -> None:
        _, take, archive, leftovers, mode = message
        self.log.append(f"  take {take}: {archive}, leftovers {leftovers}")
        assert mode == "online"
        if expected is not None:
            assert set(leftovers) == expected, self.failure(f"leftovers {leftovers}, expected {sorted(expected)}")
        self.results.append((archive, leftovers))

    def kill(self, number: int, point: dict[str, Any], expected: set[str]) -> set[str]:
        """One run killed at ``point``; ``expected``: the leftovers its first take must report; returns its own."""
        check: set[str] | None = expected
        started = time.monotonic()
        pid, events, worker = self._start(point)
        opened = time.monotonic()
        while True:
            message = self._recv(events)
            if message[0] == "result":
                self._result(message, check)
                check = None
                continue
            assert message[0] == "point"
            break
        time.sleep(point["delay"])
        victims = [lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(worker, signal.SIGKILL)]
        self.rng.shuffle(victims)
        for victim in victims:
            victim()
        self.log.append(f"kill {number}: {point}, reached {message[1:]}")
        assert self._zygote_line() == ["exit", str(-signal.SIGKILL)], self.failure("the run was not killed")
        self.live = None
        events.close()
        killed = time.monotonic()
        left = self.after_kill()
        self.log.append(f"  left {sorted(left)}; open {opened - started:.2f} s, takes {killed - opened:.2f} s,"
                        f" checks {time.monotonic() - killed:.2f} s, requests {self.server.requests}")
        # (a run killed in its first take: what it left is what the next run finds)
        return left

    def after_kill(self) -> set[str]:
        """The checks after a kill; returns the uuids of the transient snapshots left."""
        deadline = time.monotonic() + _TIMEOUT
        while self.host.state("dev") is not vbremote.MachineState.RUNNING:
            assert time.monotonic() < deadline, self.failure(f"the VM is {self.host.state('dev')}")
            time.sleep(0.005)
        writes = self.sim.guest_writes("dev")
        while self.sim.guest_writes("dev") <= writes:
            assert time.monotonic() < deadline, self.failure("the guest stopped writing")
            time.sleep(0.005)
        for port in (0, 1):
            assert self.sim.disk_matches_guest("dev", port), self.failure(f"disk {port} lost guest writes")
        snapshots = self.host.vm("dev").snapshots()
        assert all(s.name.startswith(vbremote.TRANSIENT_PREFIX) for s in snapshots)
        assert len(snapshots) <= 1, self.failure(f"{len(snapshots)} transient snapshots")
        settings = parse_settings(self.sim.machine("dev").settings_path.read_bytes())
        on_disk = [settings.snapshot.uuid] if settings.snapshot else []
        assert on_disk == [s.uuid for s in snapshots], self.failure("the settings file is not the live tree")
        checked = time.monotonic()
        self.borg("check", str(self.transport.path))
        self.log.append(f"  borg check {time.monotonic() - checked:.2f} s")
        return {s.uuid for s in snapshots}

    def run(self) -> None:
        phases = [PHASES[i % len(PHASES)] for i in range(KILLS)]
        self.rng.shuffle(phases)
        expected: set[str] = set()
        for number, phase in enumerate(phases, 1):
            point = {"take": 1 if phase == "leftovers" else 2, "phase": phase,
                     "event": self.rng.randint(1, _EVENTS[phase]), "delay": self.rng.uniform(0, 0.02)}
            expected = self.kill(number, point, expected)
        # The last kill's leftover goes with one more run, which ends on its own.
        _, events, _ = self._start(None)
        message = self._recv(events)
        self._result(message, expected)
        assert self._recv(events) == ("done",)
        assert self._zygote_line() == ["exit", "0"], self.failure("the last run failed")
        self.live = None
        assert self.host.vm("dev").snapshots() == ()
        self.check_archives()

    def check_archives(self) -> None:
        """Every archive's disks are the guest's content at its instant; no checkpoint is left."""
        names = json.loads(self.borg("list", "--json", "--consider-checkpoints", str(self.transport.path)))
        listed = {a["name"] for a in names["archives"]}
        # (a run killed after its commit leaves its archive too)
        assert {name for name, _ in self.results} <= listed, self.failure(f"archives {sorted(listed)}")
        assert not [n for n in listed if ".checkpoint" in n], self.failure(f"archives {sorted(listed)}")
        with vbremote.Repository.open(self.transport, passphrase=PASSPHRASE, base_dir=self.base_dir) as repo:
            for archive in repo.archives():
                run = archive.name.removeprefix("dev-").removesuffix("-online")
                instant = self.instants[self.snapshot_uuids[vbremote.TRANSIENT_PREFIX + run]]
                folder = self.tmp_path / "check" / run
                folder.mkdir(parents=True)
                images: dict[str, Path] = {}
                for stored in archive.files:
                    if stored.medium is None and stored.role is not vbremote.FileRole.SETTINGS:
                        continue
                    chunks = repo.chunk_list(archive, stored.path).chunks
                    data = b"".join(d for _, d in repo.fetch_chunks(c.id for c in chunks))
                    target = folder / stored.path.replace("/", "_")
                    target.write_bytes(data)
                    if stored.medium is not None:
                        images[stored.medium] = target
                settings = parse_settings((folder / "dev.vbox").read_bytes())
                parents = {f.medium: f.parent for f in archive.files if f.medium is not None}
                for attachment in settings.attachments:
                    if attachment.type == "HardDisk":
                        assert attachment.medium is not None
                        image = _chain(attachment.medium, images, parents)
                        content = image.read(0, image.size)
                        assert content == instant[(attachment.controller, attachment.port, attachment.device)], \
                            self.failure(f"{archive.name}: disk {attachment.port} is not the instant")


class TestCacheRollbackKilled:
    def test_truncated_cache_config_of_an_interrupted_rollback(self, transport: vbremote.LocalTransport,
                                                               base_dir: Path, borg_cli: BorgCLI, tmp_path: Path):
        """A cache config truncated by a process killed in borg's rollback copy: the next open repairs it, writes."""
        disk = tmp_path / "disk.img"
        disk.write_bytes(os.urandom(2 * MIB))
        spec = vbremote.FileSpec(disk, "disk.img", vbremote.FileRole.DISK)
        metadata = vbremote.SnapshotMetadata(vm_name="dev", vm_uuid="3f1b2a9c-5d7e-4c1a-9b8e-2f6d0c4a7e15")
        with vbremote.Repository.init(transport, passphrase=PASSPHRASE, base_dir=base_dir) as repo:
            repo.write_archive("first", [spec], metadata)
        (cache,) = (base_dir / ".cache" / "borg").glob("*/config")
        folder = cache.parent
        # What a kill inside LocalCache.rollback's first shutil.copy leaves: the transaction's
        # saved files, and a config opened for writing and not yet written.
        (folder / "txn.active").mkdir()
        for name in ("config", "chunks", "files"):
            source = folder / name
            (folder / "txn.active" / name).write_bytes(source.read_bytes() if source.exists() else b"")
        cache.write_bytes(b"")
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir) as repo:
            assert [a.name for a in repo.archives()] == ["first"]
            repo.write_archive("second", [spec], metadata)
        assert b"[cache]" in cache.read_bytes()
        assert not (folder / "txn.active").exists()
        borg_cli("check", str(transport.path))


def _chain(uuid: str, images: dict[str, Path], parents: dict[str, str | None]) -> VDI:
    """An archived image opened with its archived parents."""
    parent = parents[uuid]
    return VDI.open(images[uuid], parent=_chain(parent, images, parents) if parent else None)


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[BaseException | None, list[str]]]:
    """Every profile's 20 kills, the profiles side by side (each its own host, repository and processes)."""
    seed = int(os.environ.get("VBREMOTE_KILL_SEED", random.randrange(1 << 32)))
    outcomes: dict[str, tuple[BaseException | None, list[str]]] = {}

    def one(number: int, profile: str, folder: Path) -> None:
        log: list[str] = [f"seed {seed + number}"]
        try:
            run = KillRun(profile, folder, seed + number)
            log = run.log
            try:
                run.run()
            finally:
                run.close()
            outcomes[profile] = (None, log)
        except BaseException as exc:  # reported by the profile's test
            exc.add_note(f"profile {profile}, seed {seed + number} (VBREMOTE_KILL_SEED={seed} repeats the run)\n"
                         + "\n".join(log))
            outcomes[profile] = (exc, log)

    threads = [threading.Thread(target=one, args=(n, p, tmp_path_factory.mktemp(f"kills-{p}")))
               for n, p in enumerate(VIRTUALBOX_PROFILES)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


class TestKilledRuns:
    @pytest.mark.parametrize("profile", VIRTUALBOX_PROFILES)
    def test_twenty_kills(self, profile: str, killed_runs: dict[str, tuple[BaseException | None, list[str]]]):
        """20 SIGKILLs of a run and its borg worker: borg check clean, the guest runs, the next run cleans up."""
        error, log = killed_runs[profile]
        if error is not None:
            raise error
        assert sum(line.startswith("kill ") for line in log) == KILLS
        print("\n".join(log))


if __name__ == "__main__" and sys.argv[1:] == ["--zygote"]:
    _zygote()
elif __name__ == "__main__" and sys.argv[1:] == ["--borg"]:
    _borg_zygote()
