"""What every command shares: the config, output (text or JSON), logging, errors and exit codes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from attrs import define, field
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    ProgressColumn,
    Task,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as RichProgress
from rich.text import Text

from .. import _errors as errors
from .._config import Config, RepositoryConfig, default_config_path, load_config
from .._models import Progress
from .._repository import Repository
from .._vbox import VirtualBoxHost

__all__ = ["EXIT_CODES", "App", "CommandFailed", "exit_code_for"]

log = logging.getLogger("vbremote.cli")

#: Exit codes, most specific first: the first class an error is an instance of decides.
EXIT_CODES: tuple[tuple[str, int, str], ...] = (
    ("PruneError", 6, "pruning was refused by a guard or failed (nothing was deleted)"),
    ("SnapshotError", 5, "a snapshot failed"),
    ("RestoreError", 5, "a restore failed"),
    ("ConfigurationError", 2, "bad arguments, options or config file"),
    ("RepositoryError", 3, "the repository or its transport failed"),
    ("VirtualBoxError", 4, "VirtualBox refused or failed"),
    ("VBRemoteError", 1, "any other failure"),
)
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def exit_code_for(exc: BaseException) -> int:
    """The exit code for an error (see :data:`EXIT_CODES`)."""
    for name, code, _ in EXIT_CODES:
        cls = getattr(errors, name, None)
        if cls is not None and isinstance(exc, cls):
            return code
    return EXIT_FAILURE


class CommandFailed(Exception):
    """A command ran but its outcome is a failure (e.g. a check found problems); its output is already shown.

    Attributes:
        exit_code: The exit code to leave with.
    """

    def __init__(self, message: str, *, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _interactive_default() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


@define(eq=False)
class App:
    """The state of one ``vbremote`` run, built from the global options.

    Attributes:
        config_path: ``--config``, or ``None`` for the default location.
        repo_name: ``--repo``.
        json: ``--json``: one JSON document on stdout, nothing else.
        verbosity: ``-v`` count minus ``-q`` count.
    """

    config_path: Path | None = None
    repo_name: str | None = None
    json: bool = False
    verbosity: int = 0
    _config: Config | None = field(default=None, init=False)
    _cleanups: contextlib.ExitStack = field(factory=contextlib.ExitStack, init=False)
    _host: VirtualBoxHost | None = field(default=None, init=False)
    stdout: Console = field(factory=lambda: _stdout_console(), init=False)
    stderr: Console = field(factory=lambda: Console(stderr=True, soft_wrap=True, highlight=False), init=False)

    # -- config, repository, VirtualBox ------------------------------------------

    @property
    def config(self) -> Config:
        """The config file, read on first use."""
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config

    def repository_config(self) -> RepositoryConfig:
        """The repository chosen by ``--repo`` or the config's default."""
        return self.config.repository(self.repo_name)

    def open_repository(self, *, read_only: bool = False) -> Repository:
        """Open the chosen repository for the rest of the run."""
        settings = self.repository_config()
        log.info("opening repository %s at %s", settings.name, settings.transport.location)
        repo = Repository.open(
            settings.transport,
            passphrase=settings.passphrase(),
            lock_wait=settings.lock_wait,
            read_only=read_only,
            base_dir=settings.borg_base_dir,
        )
        self._cleanups.callback(repo.close)
        return repo

    def host(self) -> VirtualBoxHost:
        """The VirtualBox host: the installed one, or the simulated test double the config selects."""
        if self._host is None:
            vbox = self.config.virtualbox
            if vbox.simulated:
                from ..testing import SimulatedVirtualBox

                assert vbox.home is not None
                simulator = SimulatedVirtualBox(vbox.home, version=vbox.version, workload=None)
                self._cleanups.callback(simulator.close)
                self._host = VirtualBoxHost.connect(manager=simulator.manager())
            else:
                try:
                    self._host = VirtualBoxHost.connect()
                except errors.VirtualBoxUnavailable as exc:
                    if self.config.file is not None:
                        raise
                    # No config file at all: say so, since a user who put it in the wrong
                    # place would otherwise be told to install VirtualBox.
                    raise errors.VirtualBoxUnavailable(
                        f"{exc} (no config file was found at {default_config_path()}, so the installed"
                        " VirtualBox is used; give --config, or select the simulated one in [virtualbox])"
                    ) from exc
        return self._host

    @property
    def simulated(self) -> bool:
        """The config selects the simulated VirtualBox (a test double)."""
        return self.config.virtualbox.simulated

    def state_dir(self) -> Path:
        """Where the command keeps its state (the last VM chosen)."""
        if self.config.state_dir is not None:
            return self.config.state_dir
        base = os.environ.get("XDG_STATE_HOME", "")
        root = Path(base) if base and os.path.isabs(base) else Path.home() / ".local" / "state"
        return root / "vbremote"

    def close(self) -> None:
        """Close what the run opened (repositories, the simulator), newest first."""
        self._cleanups.close()

    # -- output -------------------------------------------------------------------

    @property
    def interactive(self) -> bool:
        """A person is at a terminal: choices and confirmations may be asked."""
        return not self.json and _interactive_default()

    @property
    def show_progress(self) -> bool:
        """Progress bars are drawn: stderr is a terminal, and neither ``--json`` nor ``-q``."""
        return not self.json and self.verbosity >= 0 and sys.stderr.isatty()

    def emit(self, document: dict[str, Any]) -> None:
        """Write the command's JSON document to stdout (``--json`` only)."""
        if self.json:
            sys.stdout.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
            sys.stdout.flush()

    def say(self, *objects: Any) -> None:
        """Show something to a person on stdout (not with ``--json``)."""
        if not self.json:
            self.stdout.print(*objects)

    def note(self, message: str) -> None:
        """A remark on stderr (not with ``-q``)."""
        if self.verbosity >= 0:
            self.stderr.print(message, markup=False)

    def warn(self, message: str) -> None:
        """A warning on stderr (even with ``-q``) and in the log file."""
        log.debug("warning: %s", message)
        sys.stderr.write(f"vbremote: warning: {message}\n")
        sys.stderr.flush()

    @contextlib.contextmanager
    def progress(self) -> Iterator[Callable[[Progress], None] | None]:
        """A progress callback that draws bars on the terminal, or ``None`` where none are drawn."""
        if not self.show_progress:
            yield None
            return
        columns = (TextColumn("{task.description}"), BarColumn(), _Amount(), _Rate(), TimeRemainingColumn())
        with RichProgress(*columns, console=self.stderr, transient=False) as bars:
            tasks: dict[tuple[str, str], TaskID] = {}

            def update(event: Progress) -> None:
                key = (event.operation, event.path)
                counted = event.operation in _COUNTED_PHASES
                # A counted phase with nothing to count (no leftovers) is done, not pulsing.
                total, done = (1, 1) if counted and not event.total else (event.total or None, event.done)
                if key not in tasks:
                    label = f"{event.operation} {event.path}".strip()
                    tasks[key] = bars.add_task(label, total=total, counted=counted)
                bars.update(tasks[key], completed=done, total=total)

            yield update


# Phases whose progress counts steps or percent, not bytes.
_COUNTED_PHASES = frozenset({"locking", "leftovers", "snapshot", "merge", "register", "start", "power off", "verify"})


class _Amount(ProgressColumn):
    """Bytes done of the total for byte phases, the percentage for the others."""

    def __init__(self) -> None:
        super().__init__()
        self._bytes = DownloadColumn(binary_units=True)
        self._percent = TaskProgressColumn()

    def render(self, task: Task) -> Text:
        if task.fields.get("counted"):
            return self._percent.render(task)
        return self._bytes.render(task)


class _Rate(ProgressColumn):
    """The transfer rate of a byte phase."""

    def __init__(self) -> None:
        super().__init__()
        self._speed = TransferSpeedColumn()

    def render(self, task: Task) -> Text:
        return Text("") if task.fields.get("counted") else self._speed.render(task)


def setup_logging(verbosity: int, log_file: Path | None) -> None:
    """Send vbremote's log to stderr by verbosity (and everything to ``--log-file``)."""
    logger = logging.getLogger("vbremote")
    for handler in list(logger.handlers):
        if getattr(handler, "_vbremote_cli", False):
            logger.removeHandler(handler)
            handler.close()
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(max(-1, min(verbosity, 2)), logging.DEBUG)
    stream = logging.StreamHandler(sys.stderr)
    stream.setLevel(level)
    stream.setFormatter(logging.Formatter("vbremote: %(levelname)s: %(message)s"))
    stream._vbremote_cli = True  # type: ignore[attr-defined]
    logger.addHandler(stream)
    logger.setLevel(min(level, logging.DEBUG if log_file else level))
    if log_file is not None:
        try:
            handler = logging.FileHandler(log_file, encoding="utf-8")
        except OSError as exc:
            raise errors.ConfigurationError(f"--log-file {log_file}: {exc.strerror}") from exc
        handler.setLevel(logging.DEBUG)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        handler._vbremote_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False


def report_error(exc: BaseException, *, code: int, as_json: bool, verbosity: int) -> None:
    """Show an error: one line on stderr (with ``-v`` the traceback), and with ``--json`` a document on stdout."""
    message = str(exc) or type(exc).__name__
    if verbosity > 0:
        traceback.print_exception(exc, file=sys.stderr)
    sys.stderr.write(f"vbremote: error: {message}\n")
    sys.stderr.flush()
    log.debug("exit %d: %s: %s", code, type(exc).__name__, message, exc_info=exc)
    if as_json:
        document = {"error": {"type": type(exc).__name__, "message": message, "exit_code": code}}
        sys.stdout.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
        sys.stdout.flush()


def _stdout_console() -> Console:
    """The console for results: at a terminal its width; piped, as wide as a table needs.

    Archive names are what a user passes back to ``info`` and ``restore``, so a
    pipe must never get them cut to 80 columns (rich's default off a terminal).
    """
    console = Console(soft_wrap=True, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(soft_wrap=True, highlight=False, width=1000)
    return console
