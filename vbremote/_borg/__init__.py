"""The borg adapter: vbremote's only door to borg.

borg has no stable Python API and assumes it owns its process (logging
setup, prompts, environment variables, per-process locks, umask). So the
borg code runs in a worker process (:mod:`._worker`, the only module that
imports ``borg``), one per open repository, and this module talks to it over
a pipe. Two opens of one repository are two processes, so borg's own locking
works between them exactly as between two ``borg`` commands.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from .. import _errors
from . import _protocol

__all__ = ["BorgWorker", "ProgressCallback"]

#: Called with (operation, path, bytes done, bytes total).
ProgressCallback = Callable[[str, str, int, int], None]

_log = logging.getLogger("vbremote.borg")

# The one table from the worker's error kinds to vbremote's errors.
_ERRORS: Mapping[str, type[_errors.RepositoryError]] = {
    "not_found": _errors.RepositoryNotFound,
    "exists": _errors.RepositoryExists,
    "passphrase_wrong": _errors.PassphraseWrong,
    "passphrase_missing": _errors.PassphraseMissing,
    "locked": _errors.RepositoryLocked,
    "access_denied": _errors.AccessDenied,
    "connection": _errors.ConnectionFailed,
    "integrity": _errors.IntegrityError,
    "archive_missing": _errors.ArchiveNotFound,
    "archive_exists": _errors.ArchiveExists,
    "file_missing": _errors.FileNotInArchive,
    "changed": _errors.SourceChanged,
    "os": _errors.RepositoryError,
}

_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


class BorgWorker:
    """A worker process holding one repository connection; calls are serialised.

    Args:
        location: The repository location, for error messages.
        env: Variables to set for the worker only (never in this process).
    """

    def __init__(self, location: str, env: Mapping[str, str]) -> None:
        self.location = location
        child_env = dict(os.environ)
        child_env.update(env)
        # The worker must import this very vbremote, installed or not.
        child_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_PARENT, os.environ.get("PYTHONPATH", "")) if p
        )
        pass_fds: tuple[int, ...] = ()
        fd_var = child_env.get("BORG_PASSPHRASE_FD", "")
        if fd_var.isdigit():
            pass_fds = (int(fd_var),)
        self._lock = threading.Lock()
        self._result: Any = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=50)
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "vbremote._borg._worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=child_env,
                # No controlling terminal: nothing borg or ssh does can prompt on it.
                start_new_session=True,
                pass_fds=pass_fds,
            )
        except OSError as exc:
            raise _errors.RepositoryError(f"cannot start the borg worker: {exc}", location=location) from exc
        assert self._process.stdin is not None
        assert self._process.stdout is not None
        self._stdin: IO[bytes] = self._process.stdin
        self._stdout: IO[bytes] = self._process.stdout
        self._stderr_reader = threading.Thread(
            target=self._read_stderr, name="vbremote-borg-stderr", daemon=True
        )
        self._stderr_reader.start()
        self._closed = False

    def _read_stderr(self) -> None:
        stream = self._process.stderr
        assert stream is not None
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self._stderr.append(line)
                _log.debug("borg worker: %s", line)

    # -- calls ------------------------------------------------------------

    def call(self, op: str, progress: ProgressCallback | None = None, **kwargs: Any) -> Any:
        """Run one operation in the worker and return its result.

        If the call is interrupted here (KeyboardInterrupt, or an exception
        from the progress callback), the worker is killed: its uncommitted
        work is discarded, as borg discards a killed command's, and the
        repository must be opened again.
        """
        with self._lock:
            self._send(op, kwargs)
            try:
                for _ in self._replies(progress):
                    raise _errors.RepositoryError(f"unexpected streamed reply to {op}", location=self.location)
            except _errors.VBRemoteError:
                raise
            except BaseException:
                self._kill()
                raise
            return self._result

    def stream(self, op: str, progress: ProgressCallback | None = None, **kwargs: Any) -> Iterator[Any]:
        """Run one operation that streams items; yields them as they arrive.

        Leaving the loop early still drains the rest, so the pipe stays in step.
        """
        with self._lock:
            self._send(op, kwargs)
            replies = self._replies(progress)
            try:
                # Not "yield from": closing this generator must not close
                # `replies`, which the finally clause still drains.
                for item in replies:  # noqa: UP028
                    yield item
            finally:
                for _ in replies:
                    pass

    def _send(self, op: str, kwargs: Mapping[str, Any]) -> None:
        if self._closed:
            raise _errors.RepositoryError("the repository is closed", location=self.location)
        try:
            _protocol.send(self._stdin, (op, dict(kwargs)))
        except OSError as exc:
            raise self._died() from exc

    def _replies(self, progress: ProgressCallback | None) -> Iterator[Any]:
        while True:
            try:
                message = _protocol.receive(self._stdout)
            except (EOFError, OSError) as exc:
                raise self._died() from exc
            tag = message[0]
            if tag == _protocol.ITEM:
                yield message[1]
            elif tag == _protocol.LOG:
                _, level, name, text = message
                logger_name = name if name.startswith("vbremote.") else "vbremote.borg." + name
                logging.getLogger(logger_name).log(level, "%s", text)
            elif tag == _protocol.PROGRESS:
                if progress is not None:
                    progress(*message[1:])
            elif tag == _protocol.OK:
                self._result = message[1]
                return
            elif tag == _protocol.ERROR:
                raise self._error(*message[1:])

    def _error(self, kind: str, message: str, context: Mapping[str, Any]) -> _errors.VBRemoteError:
        if kind == "config":
            return _errors.ConfigurationError(message)
        cls = _ERRORS.get(kind)
        if cls is _errors.IntegrityError:
            return _errors.IntegrityError(message, location=self.location, chunk_id=context.get("chunk_id"))
        if cls is _errors.ArchiveNotFound or cls is _errors.ArchiveExists:
            return cls(message, location=self.location, archive=context.get("archive", ""))
        if cls is _errors.FileNotInArchive:
            return _errors.FileNotInArchive(
                message, location=self.location, archive=context.get("archive", ""), path=context.get("path", "")
            )
        if cls is not None:
            return cls(message, location=self.location)
        return _errors.BorgError(message, location=self.location, borg_class=context.get("borg_class", ""))

    def _died(self) -> _errors.RepositoryError:
        self._reap()
        tail = " | ".join(list(self._stderr)[-5:])
        return _errors.RepositoryError(
            f"the borg worker ended unexpectedly (exit code {self._process.returncode})"
            f"{': ' + tail if tail else ''}",
            location=self.location,
        )

    def close(self) -> None:
        """Ask the worker to close the repository (releasing its lock) and wait for it."""
        if self._closed:
            return
        try:
            self.call("close")
        except _errors.RepositoryError:
            pass  # a worker that is already gone has released its lock with its process
        finally:
            self._reap()

    def _kill(self) -> None:
        with contextlib.suppress(OSError):
            self._process.kill()
        self._reap()

    def abandon(self) -> None:
        """After a failed open: reap the worker, which has already exited."""
        self._reap()

    def _reap(self) -> None:
        self._closed = True
        for stream in (self._stdin, self._stdout):
            with contextlib.suppress(OSError):
                stream.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._stderr_reader.join(timeout=5)
        if self._process.stderr is not None:
            self._process.stderr.close()
