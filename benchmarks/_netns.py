"""A rate-limited network link to a 'server' in a Linux network namespace, with sshd inside.

Used by the restore benchmark and by the network tests (which import it from
here). Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN), iproute2 (``ip``,
``tc``) and openssh-server.

    with NetnsLink.create(rate_mbit=50) as link, NetnsSSHD.start(link, folder) as sshd:
        transport = sshd.transport("/srv/repo")      # a vbremote.SSHTransport into the namespace
        link.down(); link.up()                        # cut the link and bring it back
        link.host_rx_bytes()                          # bytes the host received on the link

The namespace shares the file system with the host (only the network is
separate): a repository in a temporary folder is served by the namespace's
``borg serve`` and every byte of it crosses the veth pair, through ``tc tbf``
in both directions. Everything is removed on close, on failure during setup,
and at interpreter exit; namespaces left by a process that was killed are
removed by the next :meth:`NetnsLink.create`.
"""

from __future__ import annotations

import atexit
import contextlib
import getpass
import itertools
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import vbremote

PREFIX = "vbrn"
_counter = itertools.count()


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no iproute2, a restricted container)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace(name: str) -> None:
    """SIGKILL every process in the namespace, then delete it (its veth pair goes with it)."""
    result = _ip("netns", "pids", name, check=False)
    for line in result.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(line), signal.SIGKILL)
    _ip("netns", "del", name, check=False)


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces of this harness whose creating process is gone. Returns their names."""
    result = _ip("netns", "list", check=False)
    removed = []
    for line in result.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        parts = name.split("-")
        if len(parts) == 3 and parts[0] == PREFIX and parts[1].isdigit() and not _pid_alive(int(parts[1])):
            _kill_namespace(name)
            removed.append(name)
    return removed


def netns_available() -> str | None:
    """``None`` when this process can make network namespaces, else the reason it cannot."""
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package iproute2)"
    name = f"{PREFIX}-{os.getpid()}-probe"
    result = _ip("netns", "add", name, check=False)
    if result.returncode != 0:
        return f"ip netns add is not permitted here: {result.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


class NetnsLink:
    """A namespace joined to the host by a veth pair on a private /30, rate-limited with tc tbf both ways.

    Attributes:
        name: The namespace's name (``ip netns exec NAME ...``).
        host_if, ns_if: The veth ends on the host and in the namespace.
        host_addr, ns_addr: Their IPv4 addresses.
        rate_mbit: The configured rate of each direction.
    """

    def __init__(self, name: str, host_if: str, ns_if: str, host_addr: str, ns_addr: str, rate_mbit: float) -> None:
        self.name = name
        self.host_if = host_if
        self.ns_if = ns_if
        self.host_addr = host_addr
        self.ns_addr = ns_addr
        self.rate_mbit = rate_mbit
        self.closed = False

    @classmethod
    @contextlib.contextmanager
    def create(cls, rate_mbit: float = 50.0, *, delay_ms: float = 0.0) -> Iterator[NetnsLink]:
        """Make the namespace and link, yield it, remove everything afterwards.

        Args:
            rate_mbit: The rate limit of each direction, in Mbit/s.
            delay_ms: Added one-way latency (netem under the tbf), 0 for none.

        Raises:
            NetnsUnavailable: Namespaces cannot be made here.
        """
        reason = netns_available()
        if reason is not None:
            raise NetnsUnavailable(reason)
        remove_stale_namespaces()
        number = next(_counter)
        name = f"{PREFIX}-{os.getpid()}-{number}"
        tag = f"{os.getpid() % 100000}{number}"
        host_if, ns_if = f"vbh{tag}"[:15], f"vbn{tag}"[:15]
        used = _ip("-4", "addr", check=False).stdout
        rng = random.Random()
        while True:
            base = f"10.{rng.randrange(200, 250)}.{rng.randrange(0, 256)}."
            last = rng.randrange(0, 64) * 4
            host_addr, ns_addr = f"{base}{last + 1}", f"{base}{last + 2}"
            if host_addr not in used and ns_addr not in used:
                break
        link = cls(name, host_if, ns_if, host_addr, ns_addr, rate_mbit)
        atexit.register(link.close)
        try:
            _ip("netns", "add", name)
            _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
            _ip("link", "set", ns_if, "netns", name)
            _ip("addr", "add", f"{host_addr}/30", "dev", host_if)
            _ip("link", "set", host_if, "up")
            link.ns_ip("addr", "add", f"{ns_addr}/30", "dev", ns_if)
            link.ns_ip("link", "set", ns_if, "up")
            link.ns_ip("link", "set", "lo", "up")
            link._shape(None, host_if, delay_ms)
            link._shape(name, ns_if, delay_ms)
            yield link
        finally:
            link.close()
            atexit.unregister(link.close)

    def _shape(self, namespace: str | None, interface: str, delay_ms: float) -> None:
        prefix = ["ip", "netns", "exec", namespace] if namespace else []
        # The bucket holds 20 ms of traffic (at least 32 KiB), so the rate holds at any time scale
        # that matters here; tbf segments GSO packets larger than the bucket.
        burst = max(32 * 1024, int(self.rate_mbit * 1e6 / 8 * 0.02))
        rate = f"{int(self.rate_mbit * 1000)}kbit"
        if delay_ms > 0:
            commands = [
                ["tc", "qdisc", "add", "dev", interface, "root", "handle", "1:", "netem", "delay", f"{delay_ms}ms"],
                ["tc", "qdisc", "add", "dev", interface, "parent", "1:1", "handle", "10:", "tbf",
                 "rate", rate, "burst", str(burst), "latency", "100ms"],
            ]
        else:
            commands = [["tc", "qdisc", "add", "dev", interface, "root", "tbf",
                         "rate", rate, "burst", str(burst), "latency", "100ms"]]
        for command in commands:
            result = subprocess.run([*prefix, *command], capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()}")

    def ns_ip(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _ip("-n", self.name, *args)

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """The command line that runs ``argv`` inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def down(self) -> None:
        """Take the link down (the host's end): packets stop both ways, the route goes away."""
        _ip("link", "set", self.host_if, "down")

    def up(self) -> None:
        """Bring the link back up, with the same address and route."""
        _ip("link", "set", self.host_if, "up")
        deadline = time.monotonic() + 10
        while "state UP" not in _ip("link", "show", self.host_if).stdout and time.monotonic() < deadline:
            time.sleep(0.05)

    def _counter(self, which: str) -> int:
        return int(Path(f"/sys/class/net/{self.host_if}/statistics/{which}").read_text())

    def host_rx_bytes(self) -> int:
        """Bytes the host received from the namespace on the link so far (IP headers included)."""
        return self._counter("rx_bytes")

    def host_tx_bytes(self) -> int:
        """Bytes the host sent to the namespace on the link so far."""
        return self._counter("tx_bytes")

    def pids(self) -> list[int]:
        return [int(pid) for pid in _ip("netns", "pids", self.name, check=False).stdout.split()]

    def close(self) -> None:
        """Kill every process in the namespace, delete it and the veth pair. Idempotent."""
        if self.closed:
            return
        self.closed = True
        _kill_namespace(self.name)
        if Path(f"/sys/class/net/{self.host_if}").exists():
            _ip("link", "del", self.host_if, check=False)


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return Path(f"{path}.pub").read_text().strip()


def borg_program() -> str:
    """The borg CLI of the environment vbremote runs in."""
    import sys

    candidate = Path(sys.executable).parent / "borg"
    return str(candidate) if candidate.exists() else shutil.which("borg") or "borg"


class NetnsSSHD:
    """sshd listening on the namespace's address, port 22, with a fresh host key and client key.

    Sessions run in the namespace's network and the host's file system, as the
    current user.
    """

    def __init__(self, link: NetnsLink, root: Path, process: subprocess.Popen[bytes]) -> None:
        self.link = link
        self.root = root
        self.process = process
        self.user = getpass.getuser()
        self.client_key = root / "client_key"
        self.known_hosts = root / "known_hosts"
        self.log = root / "sshd.log"

    @classmethod
    @contextlib.contextmanager
    def start(cls, link: NetnsLink, root: Path) -> Iterator[NetnsSSHD]:
        """Start sshd in ``link``'s namespace, its files in ``root``; stop it afterwards.

        Raises:
            NetnsUnavailable: sshd or ssh-keygen is not installed.
            RuntimeError: sshd did not start (its log is in the message).
        """
        sshd_bin = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
        if sshd_bin is None or shutil.which("ssh-keygen") is None or shutil.which("ssh") is None:
            raise NetnsUnavailable("sshd/ssh/ssh-keygen are not installed (Debian packages openssh-server, -client)")
        root.mkdir(parents=True, exist_ok=True)
        host_key = root / "host_key"
        _keygen(host_key)
        client_pub = _keygen(root / "client_key")
        (root / "authorized_keys").write_text(client_pub + "\n")
        config = root / "sshd_config"
        user = getpass.getuser()
        config.write_text(
            "\n".join([
                "Port 22",
                f"ListenAddress {link.ns_addr}",
                f"HostKey {host_key}",
                f"PidFile {root / 'sshd.pid'}",
                f"AuthorizedKeysFile {root / 'authorized_keys'}",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "StrictModes no",
                "UsePAM no",
                "UseDNS no",
                f"AllowUsers {user}",
                "MaxStartups 50",
                "LogLevel VERBOSE",
                "",
            ])
        )
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        host_pub = Path(f"{host_key}.pub").read_text().split()
        (root / "known_hosts").write_text(f"{link.ns_addr} {host_pub[0]} {host_pub[1]}\n")
        with open(root / "sshd.log", "wb") as log:
            process = subprocess.Popen(link.exec_argv([sshd_bin, "-D", "-e", "-f", str(config)]), stderr=log)
        server = cls(link, root, process)
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    socket.create_connection((link.ns_addr, 22), timeout=0.5).close()
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"sshd did not start: {server.log.read_text()}") from None
                    time.sleep(0.05)
            yield server
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def ssh_options(self, *, alive_seconds: int | None = None) -> tuple[str, ...]:
        """``-o`` options for the client: this server's known host key, and optionally a dead-link timeout.

        Args:
            alive_seconds: If given, ssh gives up on a connection that has not
                answered for about this many seconds (ServerAliveInterval=1).
        """
        options = [f"UserKnownHostsFile={self.known_hosts}", "StrictHostKeyChecking=yes", "ConnectTimeout=3"]
        if alive_seconds is not None:
            options += ["ServerAliveInterval=1", f"ServerAliveCountMax={alive_seconds}"]
        return tuple(options)

    def ssh_argv(self, *remote_command: str, alive_seconds: int | None = None) -> list[str]:
        """``ssh`` to this server with its key and options, running ``remote_command`` (a shell line)."""
        return [*self.ssh_base(alive_seconds=alive_seconds), f"{self.user}@{self.link.ns_addr}", *remote_command]

    def ssh_base(self, *, alive_seconds: int | None = None) -> list[str]:
        """``ssh`` and its options without the host (what ``rsync -e`` takes)."""
        argv = ["ssh", "-o", "BatchMode=yes", "-i", str(self.client_key), "-o", "IdentitiesOnly=yes"]
        for option in self.ssh_options(alive_seconds=alive_seconds):
            argv += ["-o", option]
        return argv

    def transport(self, path: Path | str, *, alive_seconds: int | None = None) -> vbremote.SSHTransport:
        """A :class:`vbremote.SSHTransport` to a repository at ``path`` through the link."""
        return vbremote.SSHTransport(
            self.link.ns_addr,
            str(path),
            user=self.user,
            port=22,
            identity_file=self.client_key,
            ssh_options=self.ssh_options(alive_seconds=alive_seconds),
            remote_borg=borg_program(),
        )
