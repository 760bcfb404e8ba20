"""The ``vbremote`` command's config file: TOML, validated into frozen attrs classes.

The file lives at ``$XDG_CONFIG_HOME/vbremote/config.toml`` (else
``~/.config/vbremote/config.toml``); ``vbremote --config PATH`` names another.
Every value is checked when the file is read, and a bad one raises
:class:`~vbremote.ConfigFileError` naming the file and the dotted key, so a
typo is found before anything runs. Unknown keys are refused too.

Passphrases are never stored in the file: a repository names where its
passphrase comes from (``passphrase_command``, ``passphrase_env`` or
``passphrase_file``), and a literal ``passphrase`` key is refused.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tomllib
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from attrs import field, frozen

from ._errors import ConfigFileError, ConfigurationError, PassphraseMissing
from ._models import SnapshotMode
from ._repository import DEFAULT_ENCRYPTION, ENCRYPTION_MODES
from ._retention import KeepLabels, KeepRules, RetentionPolicy
from ._transports import CommandTransport, LocalTransport, SSHTransport, Transport

__all__ = [
    "COMMANDS",
    "EVENTS",
    "Config",
    "Hook",
    "Pings",
    "RepositoryConfig",
    "VMConfig",
    "VirtualBoxConfig",
    "default_config_path",
    "load_config",
    "parse_config",
]

#: The commands that send pings and run hooks.
COMMANDS = ("init", "snapshot", "restore", "prune", "check", "drill")
#: The events of a command run.
EVENTS = ("start", "success", "failure")
#: The snapshot modes a VM's ``mode`` may name.
MODES = ("auto", *(m.value for m in SnapshotMode))

_PASSPHRASE_TIMEOUT = 60.0
_WITHIN = re.compile(r"^([1-9][0-9]*)([SMHdwmy])$")
_WITHIN_UNITS = {
    "S": timedelta(seconds=1),
    "M": timedelta(minutes=1),
    "H": timedelta(hours=1),
    "d": timedelta(days=1),
    "w": timedelta(weeks=1),
    # borg's own lengths for a month and a year in --keep-within.
    "m": timedelta(days=31),
    "y": timedelta(days=365),
}
_KEEP_COUNTS = (
    "last",
    "secondly",
    "minutely",
    "hourly",
    "daily",
    "weekly",
    "monthly",
    "quarterly_13weekly",
    "quarterly_3monthly",
    "yearly",
)


def default_config_path() -> Path:
    """The config file's default location: ``$XDG_CONFIG_HOME/vbremote/config.toml``.

    Returns:
        The path (it may not exist).
    """
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "vbremote" / "config.toml"


@frozen
class RepositoryConfig:
    """A repository the command can use.

    Attributes:
        name: Its name in the config (``[repositories.NAME]``).
        transport: How it is reached.
        encryption: The encryption mode ``vbremote init`` creates it with.
        passphrase_command: A command whose standard output is the passphrase.
        passphrase_env: An environment variable that holds the passphrase.
        passphrase_file: A file that holds the passphrase (one line).
        lock_wait: Seconds to wait for borg's repository lock.
        borg_base_dir: borg's base folder for keys and caches (default: borg's own).
    """

    name: str
    transport: Transport
    encryption: str = DEFAULT_ENCRYPTION
    passphrase_command: tuple[str, ...] | None = None
    passphrase_env: str | None = None
    passphrase_file: Path | None = None
    lock_wait: float = 1.0
    borg_base_dir: Path | None = None

    def passphrase(self) -> Callable[[], str] | None:
        """Where the passphrase comes from, asked only when the repository is opened.

        Returns:
            A callable that returns the passphrase, or ``None`` when the config
            names no source (borg's own ``BORG_PASSPHRASE``/``BORG_PASSCOMMAND`` apply).

        The callable raises :class:`~vbremote.PassphraseMissing` when its
        source fails (the command fails, the variable is unset, the file is unreadable).
        """
        location = self.transport.location
        where = f"repositories.{self.name}"
        if self.passphrase_command is not None:
            argv = self.passphrase_command

            def from_command() -> str:
                try:
                    done = subprocess.run(
                        argv, capture_output=True, text=True, timeout=_PASSPHRASE_TIMEOUT, check=False
                    )
                except (OSError, subprocess.TimeoutExpired) as exc:
                    raise PassphraseMissing(
                        f"{where}.passphrase_command could not run: {exc}", location=location
                    ) from exc
                if done.returncode != 0:
                    words = done.stderr.strip().splitlines()[-1:] or [""]
                    raise PassphraseMissing(
                        f"{where}.passphrase_command failed with exit code {done.returncode}: {words[0]}",
                        location=location,
                    )
                return done.stdout.rstrip("\r\n")

            return from_command
        if self.passphrase_env is not None:
            name = self.passphrase_env

            def from_env() -> str:
                value = os.environ.get(name)
                if value is None:
                    raise PassphraseMissing(
                        f"the environment variable {name} ({where}.passphrase_env) is not set", location=location
                    )
                return value

            return from_env
        if self.passphrase_file is not None:
            path = self.passphrase_file

            def from_file() -> str:
                try:
                    return path.read_text(encoding="utf-8").rstrip("\r\n")
                except OSError as exc:
                    raise PassphraseMissing(
                        f"{where}.passphrase_file {path} cannot be read: {exc.strerror}", location=location
                    ) from exc

            return from_file
        return None


@frozen
class VMConfig:
    """Settings for one VM (``[vms.NAME]``).

    Attributes:
        name: The VM's name (or uuid).
        mode: The snapshot mode: ``auto``, ``online``, ``offline`` or ``migrate``.
        labels: Labels given to its snapshots.
        keep: Its retention rules (borg's), or ``None`` for the default ``[keep]``.
        keep_labels: Archives with one of these labels are kept too.
        seeds: Files a restore may copy matching blocks from instead of fetching them.
    """

    name: str
    mode: str = "auto"
    labels: tuple[str, ...] = ()
    keep: KeepRules | None = None
    keep_labels: frozenset[str] = frozenset()
    seeds: tuple[Path, ...] = ()


@frozen
class Hook:
    """A command run on events, with the event as a JSON document on its standard input.

    Attributes:
        command: The command line.
        on: The commands it runs for (empty: all).
        events: The events it runs on.
        timeout: Seconds before it is killed.
    """

    command: tuple[str, ...]
    on: frozenset[str] = frozenset()
    events: frozenset[str] = frozenset(EVENTS)
    timeout: float = 60.0

    def wants(self, command: str, event: str) -> bool:
        """Whether the hook runs for this command and event."""
        return (not self.on or command in self.on) and event in self.events


@frozen
class Pings:
    """Healthchecks-style ping URLs, one per command.

    Attributes:
        urls: The URL for each command that pings.
        timeout: Seconds before a ping is given up.
    """

    urls: Mapping[str, str] = field(factory=dict)
    timeout: float = 10.0


@frozen
class VirtualBoxConfig:
    """Which VirtualBox the command talks to.

    Attributes:
        backend: ``vboxapi`` (the installed VirtualBox) or ``simulated`` (the
            test double :class:`vbremote.testing.SimulatedVirtualBox`).
        home: The simulated VirtualBox's home folder.
        version: The simulated VirtualBox's version profile.
    """

    backend: str = "vboxapi"
    home: Path | None = None
    version: str = "7.1"

    @property
    def simulated(self) -> bool:
        """The test double is selected."""
        return self.backend == "simulated"


@frozen
class Config:
    """The whole config file.

    Attributes:
        file: Where it was read from (``None``: no file, defaults only).
        repositories: The repositories by name.
        default_repository: The repository used without ``--repo``.
        vms: Per-VM settings by VM name.
        keep: The retention rules of VMs without their own.
        keep_labels: Labels that keep archives of every VM.
        hooks: The hook commands.
        pings: The ping URLs.
        virtualbox: Which VirtualBox.
        state_dir: Where the command remembers the last VM chosen and keeps the VM locks.
    """

    file: Path | None = None
    repositories: Mapping[str, RepositoryConfig] = field(factory=dict)
    default_repository: str | None = None
    vms: Mapping[str, VMConfig] = field(factory=dict)
    keep: KeepRules | None = None
    keep_labels: frozenset[str] = frozenset()
    hooks: tuple[Hook, ...] = ()
    pings: Pings = field(factory=Pings)
    virtualbox: VirtualBoxConfig = field(factory=VirtualBoxConfig)
    state_dir: Path | None = None

    def repository(self, name: str | None = None) -> RepositoryConfig:
        """The repository named (``--repo``), else the default one.

        Raises:
            ConfigFileError: No such repository, or none chosen and no default.
        """
        file = str(self.file or "")
        if name is not None:
            if name not in self.repositories:
                known = ", ".join(sorted(self.repositories)) or "none"
                raise ConfigFileError(
                    f"no repository named {name!r} in the config (configured: {known})",
                    file=file,
                    key=f"repositories.{name}",
                )
            return self.repositories[name]
        if self.default_repository is not None:
            return self.repositories[self.default_repository]
        if len(self.repositories) == 1:
            return next(iter(self.repositories.values()))
        if not self.repositories:
            raise ConfigFileError(
                f"no repository is configured: add a [repositories.NAME] table to {file or default_config_path()}",
                file=file,
                key="repositories",
            )
        raise ConfigFileError(
            "several repositories are configured: set default_repository or pass --repo",
            file=file,
            key="default_repository",
        )

    def vm(self, name: str) -> VMConfig:
        """The VM's settings (defaults for a VM the config does not name)."""
        return self.vms.get(name) or VMConfig(name)

    def policy(self, vm: str) -> RetentionPolicy:
        """The retention policy for a VM: its rules (or the default ones), with the kept labels.

        Raises:
            ConfigFileError: Neither the VM nor the config has retention rules.
        """
        settings = self.vm(vm)
        rules = settings.keep or self.keep
        labels = settings.keep_labels | self.keep_labels
        policy: RetentionPolicy | None = rules
        if labels:
            # KeepLabels/SSHTransport convert with a bare frozenset/tuple, which mypy's attrs plugin
            # types as an unsolved Iterable[_T_co].
            kept = KeepLabels(labels)  # type: ignore[arg-type]
            policy = kept if policy is None else policy | kept
        if policy is None:
            raise ConfigFileError(
                f"no retention rules for VM {vm!r}: add a [keep] table (or [vms.\"{vm}\".keep]) to the config",
                file=str(self.file or ""),
                key="keep",
            )
        return policy


class _Table:
    """A TOML table being validated: every key read is consumed; leftovers are refused."""

    def __init__(self, data: Mapping[str, Any], key: str, file: str) -> None:
        self.data = dict(data)
        self.key = key
        self.file = file

    def at(self, key: str) -> str:
        return f"{self.key}.{key}" if self.key else key

    def error(self, key: str, message: str) -> ConfigFileError:
        where = self.at(key) if key else self.key
        return ConfigFileError(f"{self.file}: {where}: {message}", file=self.file, key=where)

    def has(self, key: str) -> bool:
        return key in self.data

    def pop(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        if key not in self.data:
            return default
        value = self.data.pop(key)
        # TOML booleans are ints in Python; a count or a port must not be true.
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.error(key, f"expected {_kind_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise self.error(key, f"expected {_kind_name(kind)}, got {_toml_type(value)}")
        return value

    def string(self, key: str, default: str | None = None) -> str | None:
        value = self.pop(key, str, default)
        if value is not None and not value:
            raise self.error(key, "must not be empty")
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        value = self.pop(key, list, [])
        if not all(isinstance(v, str) and v for v in value):
            raise self.error(key, "expected a list of non-empty strings")
        return tuple(value)

    def command(self, key: str) -> tuple[str, ...] | None:
        value = self.pop(key, (str, list))
        if value is None:
            return None
        argv = shlex.split(value) if isinstance(value, str) else value
        if not argv or not all(isinstance(v, str) and v for v in argv):
            raise self.error(key, "expected a command: a non-empty string or list of non-empty strings")
        return tuple(argv)

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        value = self.pop(key, (int, float), default)
        if value < minimum or value != value:
            raise self.error(key, f"must be at least {minimum}")
        return float(value)

    def path(self, key: str, base: Path) -> Path | None:
        value = self.string(key)
        if value is None:
            return None
        return base / Path(value).expanduser()

    def table(self, key: str) -> _Table:
        value = self.pop(key, dict, {})
        return _Table(value, self.at(key), self.file)

    def done(self) -> None:
        for key in self.data:
            raise self.error(key, "unknown key (see the config reference)")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
             dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "a table"}.get(
        type(value), type(value).__name__
    )


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate a config file.

    Args:
        path: The file; ``None`` for the default location, where a missing
            file means "no config" (defaults only).

    Returns:
        The validated config.

    Raises:
        ConfigFileError: The file named cannot be read, is not TOML, or has a
            bad or unknown key (the error names it).
    """
    explicit = path is not None
    file = Path(path) if path is not None else default_config_path()
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        if not explicit:
            return Config()
        raise ConfigFileError(f"the config file {file} does not exist", file=str(file)) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"the config file {file} cannot be read: {exc}", file=str(file)) from exc
    return parse_config(text, file=file)


def parse_config(text: str, *, file: str | os.PathLike[str] = "config.toml") -> Config:
    """Validate a config file's text.

    Args:
        text: The TOML text.
        file: The file's path: named in errors, and relative paths in the
            file are relative to its folder.

    Returns:
        The validated config.

    Raises:
        ConfigFileError: Not TOML, or a bad or unknown key (the error names it).
    """
    path = Path(file)
    name = str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"{name} is not valid TOML: {exc}", file=name) from exc
    base = path.parent.absolute()
    root = _Table(data, "", name)

    repositories: dict[str, RepositoryConfig] = {}
    repos = root.table("repositories")
    for repo_name in list(repos.data):
        repositories[repo_name] = _repository(repo_name, repos.table(repo_name), base)
    repos.done()

    default = root.string("default_repository")
    if default is not None and default not in repositories:
        raise root.error("default_repository", f"names {default!r}, which is not a [repositories.{default}] table")

    vms: dict[str, VMConfig] = {}
    vm_tables = root.table("vms")
    for vm_name in list(vm_tables.data):
        vms[vm_name] = _vm(vm_name, vm_tables.table(vm_name), base)
    vm_tables.done()

    keep_table = root.table("keep")
    keep = _keep(keep_table) if keep_table.data else None
    keep_table.done()
    keep_labels = frozenset(root.strings("keep_labels"))

    hooks = _hooks(root, name)
    pings = _pings(root.table("pings"))
    virtualbox = _virtualbox(root.table("virtualbox"), base)
    state_dir = root.path("state_dir", base)
    root.done()
    return Config(
        file=path,
        repositories=repositories,
        default_repository=default,
        vms=vms,
        keep=keep,
        keep_labels=keep_labels,
        hooks=hooks,
        pings=pings,
        virtualbox=virtualbox,
        state_dir=state_dir,
    )


def _repository(name: str, table: _Table, base: Path) -> RepositoryConfig:
    if table.has("passphrase"):
        raise table.error(
            "passphrase",
            "a passphrase is never stored in the config: use passphrase_command, passphrase_env or passphrase_file",
        )
    kind = table.string("transport", "local")
    ssh_keys = ("host", "user", "port", "identity", "ssh_options", "remote_borg")
    transport: Transport
    try:
        if kind == "local":
            for key in (*ssh_keys, "command", "upload_ratelimit", "append_only"):
                if table.has(key):
                    raise table.error(key, "only for transport = \"ssh\" or \"command\"")
            where = table.path("path", base)
            if where is None:
                raise table.error("path", "missing: the repository's folder")
            transport = LocalTransport(where)
        elif kind == "ssh":
            if table.has("command"):
                raise table.error("command", "only for transport = \"command\"")
            host = table.string("host")
            remote_path = table.string("path")
            if host is None:
                raise table.error("host", "missing: the SSH host")
            if remote_path is None:
                raise table.error("path", "missing: the repository's path on the host")
            port = table.pop("port", int)
            if port is not None and not 0 < port < 65536:
                raise table.error("port", "must be between 1 and 65535")
            identity = table.path("identity", base)
            transport = SSHTransport(
                host,
                remote_path,
                user=table.string("user"),
                port=port,
                identity_file=identity,
                ssh_options=table.strings("ssh_options"),  # type: ignore[arg-type]
                remote_borg=table.string("remote_borg", "borg") or "borg",
                upload_ratelimit=_ratelimit(table),
                append_only=table.pop("append_only", bool),
            )
        elif kind == "command":
            for key in ssh_keys:
                if table.has(key):
                    raise table.error(key, "only for transport = \"ssh\"")
            argv = table.command("command")
            remote_path = table.string("path")
            if argv is None:
                raise table.error("command", "missing: the command that reaches borg serve")
            if remote_path is None:
                raise table.error("path", "missing: the repository's path sent to the server")
            transport = CommandTransport(
                argv, remote_path, upload_ratelimit=_ratelimit(table), append_only=table.pop("append_only", bool)
            )
        else:
            raise table.error("transport", f"unknown transport {kind!r}: use \"local\", \"ssh\" or \"command\"")
    except ConfigFileError:
        raise
    except ConfigurationError as exc:
        raise table.error("", str(exc)) from exc
    encryption = table.string("encryption", DEFAULT_ENCRYPTION) or DEFAULT_ENCRYPTION
    if encryption not in ENCRYPTION_MODES:
        raise table.error("encryption", f"unknown mode {encryption!r}; one of {', '.join(ENCRYPTION_MODES)}")
    sources = [k for k in ("passphrase_command", "passphrase_env", "passphrase_file") if table.has(k)]
    if len(sources) > 1:
        raise table.error(sources[1], f"give one passphrase source, not {' and '.join(sources)}")
    passphrase_command = table.command("passphrase_command")
    passphrase_env = table.string("passphrase_env")
    passphrase_file = table.path("passphrase_file", base)
    lock_wait = table.number("lock_wait", 1.0)
    borg_base_dir = table.path("borg_base_dir", base)
    table.done()
    return RepositoryConfig(
        name=name,
        transport=transport,
        encryption=encryption,
        passphrase_command=passphrase_command,
        passphrase_env=passphrase_env,
        passphrase_file=passphrase_file,
        lock_wait=lock_wait,
        borg_base_dir=borg_base_dir,
    )


def _ratelimit(table: _Table) -> int:
    value = table.pop("upload_ratelimit", int, 0)
    if value < 0:
        raise table.error("upload_ratelimit", "must be 0 (none) or a positive number of KiB/s")
    return int(value)


def _vm(name: str, table: _Table, base: Path) -> VMConfig:
    mode = table.string("mode", "auto") or "auto"
    if mode not in MODES:
        raise table.error("mode", f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    labels = table.strings("labels")
    keep_table = table.table("keep")
    keep = _keep(keep_table) if keep_table.data else None
    keep_table.done()
    keep_labels = frozenset(table.strings("keep_labels"))
    seeds = tuple(base / Path(s).expanduser() for s in table.strings("seeds"))
    table.done()
    return VMConfig(name=name, mode=mode, labels=labels, keep=keep, keep_labels=keep_labels, seeds=seeds)


def _keep(table: _Table) -> KeepRules:
    kwargs: dict[str, Any] = {}
    within = table.string("within")
    if within is not None:
        match = _WITHIN.match(within)
        if match is None:
            raise table.error("within", f"{within!r} is not an interval like \"2d\" (units S M H d w m y)")
        kwargs["within"] = int(match.group(1)) * _WITHIN_UNITS[match.group(2)]
    for key in _KEEP_COUNTS:
        value = table.pop(key, int)
        if value is not None:
            if value < 0:
                raise table.error(key, "must be 0 or more")
            kwargs[key] = value
    table.done()
    try:
        return KeepRules(**kwargs)
    except ConfigurationError as exc:
        raise table.error("", str(exc)) from exc


def _hooks(root: _Table, file: str) -> tuple[Hook, ...]:
    value = root.pop("hooks", list, [])
    hooks = []
    for index, item in enumerate(value):
        key = f"hooks[{index}]"
        if not isinstance(item, dict):
            raise ConfigFileError(f"{file}: {key}: expected a table ([[hooks]])", file=file, key=key)
        table = _Table(item, key, file)
        argv = table.command("command")
        if argv is None:
            raise table.error("command", "missing: the command to run")
        on = table.strings("on")
        for command in on:
            if command not in COMMANDS:
                raise table.error("on", f"unknown command {command!r}; one of {', '.join(COMMANDS)}")
        events = table.strings("events") or EVENTS
        for event in events:
            if event not in EVENTS:
                raise table.error("events", f"unknown event {event!r}; one of {', '.join(EVENTS)}")
        timeout = table.number("timeout", 60.0, minimum=0.1)
        table.done()
        hooks.append(Hook(command=argv, on=frozenset(on), events=frozenset(events), timeout=timeout))
    return tuple(hooks)


def _pings(table: _Table) -> Pings:
    timeout = table.number("timeout", 10.0, minimum=0.1)
    urls = {}
    for command in list(table.data):
        if command not in COMMANDS:
            raise table.error(command, f"unknown command; pings are per command: {', '.join(COMMANDS)}")
        url = table.string(command)
        assert url is not None
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise table.error(command, f"{url!r} is not an http(s) URL")
        urls[command] = url.rstrip("/")
    table.done()
    return Pings(urls=urls, timeout=timeout)


def _virtualbox(table: _Table, base: Path) -> VirtualBoxConfig:
    backend = table.string("backend", "vboxapi") or "vboxapi"
    if backend not in ("vboxapi", "simulated"):
        raise table.error("backend", f"unknown backend {backend!r}: \"vboxapi\" or \"simulated\" (a test double)")
    if backend == "vboxapi":
        for key in ("home", "version"):
            if table.has(key):
                raise table.error(key, "only for backend = \"simulated\"")
    home = table.path("home", base)
    version = table.string("version", "7.1") or "7.1"
    if backend == "simulated" and home is None:
        raise table.error("home", "missing: the simulated VirtualBox's home folder")
    table.done()
    return VirtualBoxConfig(backend=backend, home=home, version=version)
