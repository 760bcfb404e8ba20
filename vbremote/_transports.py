"""Transports: how vbremote reaches a borg repository.

A transport is a small value: either a local folder, or a command whose
standard input and output speak to ``borg serve`` (borg's own remote
protocol). :class:`SSHTransport` is such a command built from SSH options;
:class:`CommandTransport` takes any command (a jump host, ``docker exec``,
a wrapper that adds a VPN …). Third parties subclass :class:`Transport`
and prove their transport with :func:`vbremote.testing.check_transport`.
"""

from __future__ import annotations

import abc
import os
import shlex
from collections.abc import Sequence
from pathlib import Path

from attrs import field, frozen

from ._errors import ConfigurationError

__all__ = ["CommandTransport", "LocalTransport", "SSHTransport", "Transport"]


class Transport(abc.ABC):
    """How to reach one borg repository.

    Subclasses implement :attr:`path`, :attr:`location` and
    :meth:`serve_command`. vbremote hands a transport to the worker process
    that runs borg by pickling it, so a transport class must be picklable
    (plain attrs classes are) and importable by its module path in that
    process: defined at the top level of a module that the worker finds on
    its ``sys.path`` (the caller's ``PYTHONPATH``, the current folder, the
    installed packages). A class defined in ``__main__``, inside a function,
    or in a module found only through this process's own ``sys.path``
    changes is refused at :meth:`Repository.open <vbremote.Repository.open>`
    and :meth:`~vbremote.Repository.init` with a
    :class:`~vbremote.ConfigurationError`.
    """

    @property
    @abc.abstractmethod
    def path(self) -> str:
        """The repository path as the serving side understands it.

        For a local transport an absolute path; through ``borg serve`` the path
        is passed unchanged to the server, which resolves ``~/x`` against the
        serving user's home and a relative path against its working folder.
        """

    @property
    @abc.abstractmethod
    def location(self) -> str:
        """A human-readable location, in borg's own syntax where there is one (for messages)."""

    @abc.abstractmethod
    def serve_command(self) -> Sequence[str] | None:
        """The command line that starts ``borg serve`` (or reaches one), or ``None`` for a local folder.

        The command's standard input and output must carry borg's remote
        protocol; its standard error is read as the remote's messages.
        It must never wait for a terminal: vbremote starts it without one.
        """

    @property
    def upload_ratelimit(self) -> int:
        """Upload limit in KiB/s (0: none). Honoured for ``borg serve`` transports."""
        return 0

    @property
    def append_only(self) -> bool | None:
        """Whether the serving side is known to force append-only mode (``None``: not known).

        borg's protocol does not tell a client that the server forces
        ``--append-only``, so a transport that knows says so here; results of
        deletes and compaction report it.
        """
        return None


def _absolute(path: str | os.PathLike[str]) -> str:
    text = os.fspath(path)
    if not text:
        raise ConfigurationError("a repository path must not be empty")
    return os.path.abspath(text)


@frozen
class LocalTransport(Transport):
    """A repository in a local folder (or a mounted network file system).

    Args:
        path: The repository folder; made absolute against the current folder
            when the transport is created.
    """

    _path: str = field(converter=_absolute, alias="path")

    @property
    def path(self) -> str:
        return self._path

    @property
    def location(self) -> str:
        return self._path

    def serve_command(self) -> None:
        return None


def _check_remote_path(path: str) -> str:
    if not path or "\0" in path or "\n" in path:
        raise ConfigurationError(f"invalid remote repository path {path!r}")
    return path


def _check_host(host: str) -> str:
    if not host or host.startswith("-") or any(c.isspace() for c in host) or "@" in host:
        raise ConfigurationError(f"invalid SSH host {host!r} (give the user with user=)")
    return host


def _check_port(port: int | None) -> int | None:
    if port is None:
        return None
    if type(port) is not int or not 0 < port < 65536:
        raise ConfigurationError(f"invalid SSH port {port}")
    return port


def _check_ratelimit(value: int) -> int:
    if value < 0:
        raise ConfigurationError("upload_ratelimit must be >= 0 KiB/s")
    return value


def _borg_url_path(path: str) -> str:
    if path.startswith("/"):
        return path
    if path.startswith("~"):
        return "/" + path
    return "/./" + path


@frozen
class SSHTransport(Transport):
    """A repository on a host that runs ``borg serve`` over SSH.

    Args:
        host: The SSH host name or address (an ``ssh_config`` alias works too).
        path: The repository path on the host (``~/x`` is relative to the
            SSH user's home).
        user: The SSH user; ``None`` lets ssh decide.
        port: The SSH port; ``None`` (the default) lets ssh decide, so a
            ``Port`` line of ``ssh_config`` for the host (or its alias) applies.
        identity_file: A private key to use (``ssh -i``).
        ssh_options: Extra ``-o`` options, e.g. ``("StrictHostKeyChecking=accept-new",)``.
        remote_borg: The borg program on the host.
        upload_ratelimit: Upload limit in KiB/s, 0 for none.
        append_only: Declare that the host forces ``borg serve --append-only``
            for this key (borg cannot tell a client), so results say so.
        ssh_command: The ssh client to run.

    ssh always runs with ``BatchMode=yes``: it never asks for a password or a
    host-key confirmation; an unknown host key fails with ssh's own message.
    """

    host: str = field(converter=_check_host)
    _path: str = field(converter=_check_remote_path, alias="path")
    user: str | None = field(default=None, kw_only=True)
    port: int | None = field(default=None, kw_only=True, converter=_check_port)
    identity_file: Path | None = field(default=None, kw_only=True)
    ssh_options: tuple[str, ...] = field(default=(), kw_only=True, converter=tuple)
    remote_borg: str = field(default="borg", kw_only=True)
    _upload_ratelimit: int = field(
        default=0, kw_only=True, converter=_check_ratelimit, alias="upload_ratelimit"
    )
    _append_only: bool | None = field(default=None, kw_only=True, alias="append_only")
    ssh_command: str = field(default="ssh", kw_only=True)

    @property
    def path(self) -> str:
        return self._path

    @property
    def location(self) -> str:
        user = f"{self.user}@" if self.user else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = f":{self.port}" if self.port is not None else ""
        return f"ssh://{user}{host}{port}{_borg_url_path(self._path)}"

    @property
    def upload_ratelimit(self) -> int:
        return self._upload_ratelimit

    @property
    def append_only(self) -> bool | None:
        return self._append_only

    def serve_command(self) -> list[str]:
        argv = [self.ssh_command, "-o", "BatchMode=yes"]
        if self.port is not None:
            argv += ["-p", str(self.port)]
        if self.identity_file is not None:
            argv += ["-i", os.fspath(self.identity_file), "-o", "IdentitiesOnly=yes"]
        for option in self.ssh_options:
            argv += ["-o", option]
        argv.append(f"{self.user}@{self.host}" if self.user else self.host)
        # ssh joins the remote command into one shell line: quote each word.
        argv.append(shlex.join([self.remote_borg, "serve"]))
        return argv


def _command(value: Sequence[str] | str) -> tuple[str, ...]:
    argv = tuple(shlex.split(value)) if isinstance(value, str) else tuple(value)
    if not argv or not all(isinstance(a, str) and a for a in argv):
        raise ConfigurationError("the command must be a non-empty list of non-empty strings")
    return argv


@frozen
class CommandTransport(Transport):
    """A repository reached through any command that speaks to ``borg serve``.

    Args:
        command: The command line (a list, or a string split like a shell
            would) whose stdin/stdout reach ``borg serve``, e.g.
            ``["ssh", "-J", "jump", "store", "borg", "serve"]`` or
            ``["borg", "serve", "--append-only"]``.
        path: The repository path sent to the server.
        upload_ratelimit: Upload limit in KiB/s, 0 for none.
        append_only: Declare that the command forces append-only mode.
    """

    command: tuple[str, ...] = field(converter=_command)
    _path: str = field(converter=_check_remote_path, alias="path")
    _upload_ratelimit: int = field(
        default=0, kw_only=True, converter=_check_ratelimit, alias="upload_ratelimit"
    )
    _append_only: bool | None = field(default=None, kw_only=True, alias="append_only")

    @property
    def path(self) -> str:
        return self._path

    @property
    def location(self) -> str:
        return f"{shlex.join(self.command)} :: {self._path}"

    @property
    def upload_ratelimit(self) -> int:
        return self._upload_ratelimit

    @property
    def append_only(self) -> bool | None:
        return self._append_only

    def serve_command(self) -> list[str]:
        return list(self.command)
