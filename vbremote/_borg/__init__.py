"""The borg adapter: vbremote's only door to borg.

borg has no stable Python API and assumes it owns its process (logging
setup, prompts, environment variables, per-process locks, umask). So the
borg code runs in a worker process (:mod:`._worker`, the only module that
imports ``borg``), one per open repository, and this module talks to it over
a pipe. Two opens of one repository are two processes, so borg's own locking
works between them exactly as between two ``borg`` commands.

Keeping the two ends in step (see ``_protocol``): every reply carries the id
of its request, and one request is in flight at a time. An exception raised
by the caller's own code while a request runs (a progress callback, the loop
over a stream) cancels the request: the worker rolls back, the remaining
replies are read and dropped, and the repository stays usable. Anything
that stops this module while it waits on the worker (an interrupt, a reply
with a wrong id) kills the worker instead: its uncommitted work is discarded
as borg discards a killed command's, and the repository is closed. Before a
write commits, the worker asks and waits for a go-ahead, which is refused if
the call was cancelled, so cancelled work is never committed.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import itertools
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import Any

from .. import _errors
from . import _protocol

__all__ = ["BorgWorker", "ProgressCallback", "WorkerStream"]

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
    "archive_invalid": _errors.ArchiveInvalid,
    "file_missing": _errors.FileNotInArchive,
    "changed": _errors.SourceChanged,
    "os": _errors.RepositoryError,
}

_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])

# The worker's program. It needs a handful of vbremote's modules, not the package's
# ``__init__`` (every service, a tenth of a second to import at each open): the package
# is made with its ``__init__`` not yet run; a submodule asked for is imported as usual,
# and any other name asked of the package (by a transport's own module, say) runs the
# ``__init__`` first, so everything still works as if it had been imported.
_WORKER_PROGRAM = """\
import importlib, importlib.util, sys
spec = importlib.util.find_spec("vbremote")
package = importlib.util.module_from_spec(spec)
sys.modules["vbremote"] = package
def attribute(name):
    if importlib.util.find_spec("vbremote." + name) is not None:
        return importlib.import_module("vbremote." + name)
    del package.__getattr__
    spec.loader.exec_module(package)
    return getattr(package, name)
package.__getattr__ = attribute
from vbremote._borg._worker import main
main()
"""


def _widen_pipe(fd: int) -> None:
    """Let the reply pipe hold a whole 1 MiB chunk (Linux; 64 KiB by default).

    Each read then takes a chunk in one or two system calls instead of
    sixteen, which is measurably faster for fetches; the pipe still bounds
    what the worker can send ahead of the reader.
    """
    setpipe = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setpipe is not None:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, setpipe, 1 << 20)


_SERVE_COMMAND_VAR = "VBREMOTE_SERVE_COMMAND"

# Put before the worker's program when a serve command is known: start it (as borg's
# RemoteRepository would: pipes, SIGINT ignored, private umask) before importing vbremote and
# borg, and keep the process for the worker's connect. Connecting (ssh, the server's login and
# borg serve's start) then overlaps with the worker's own start.
_EARLY_START = """\
import json, os, signal, subprocess, sys, types
command = json.loads(os.environ.pop("VBREMOTE_SERVE_COMMAND"))
os.umask(0o077)
early = types.ModuleType("_vbremote_early_serve")
try:
    early.process = subprocess.Popen(
        command, bufsize=0, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    early.command = command
    sys.modules[early.__name__] = early
except OSError:
    pass  # the worker starts it again and reports the failure as usual
"""


class BorgWorker:
    """A worker process holding one repository connection; calls are serialised.

    Args:
        location: The repository location, for error messages.
        env: Variables to set for the worker only (never in this process).
    """

    def __init__(self, location: str, env: Mapping[str, str], serve_command: Sequence[str] | None = None) -> None:
        self.location = location
        child_env = dict(os.environ)
        child_env.update(env)
        if serve_command is not None:
            # The worker starts the transport's command (ssh to borg serve) before it imports
            # anything, so that the connection is made while the worker starts (see _EARLY_START).
            child_env[_SERVE_COMMAND_VAR] = json.dumps([str(arg) for arg in serve_command])
        # The worker must import this very vbremote, installed or not.
        child_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_PARENT, os.environ.get("PYTHONPATH", "")) if p
        )
        pass_fds: tuple[int, ...] = ()
        fd_var = child_env.get("BORG_PASSPHRASE_FD", "")
        if fd_var.isdigit():
            pass_fds = (int(fd_var),)
        self._lock = threading.Lock()
        # The thread holding _lock: a second use from that thread must fail, not wait.
        self._owner: int | None = None
        self._ids = itertools.count(1)
        # The request whose final reply has not been read yet.
        self._in_flight: int | None = None
        # Whether the request in flight was told to commit (then an interrupt cannot undo it).
        self._committing = False
        self._stream: WorkerStream | None = None
        self._closed = False
        self._closed_because = ""
        self._stderr: collections.deque[str] = collections.deque(maxlen=50)
        request_read, request_write = os.pipe()
        reply_read, reply_write = os.pipe()
        _widen_pipe(reply_write)
        try:
            # -P: the caller's working folder is not put on the worker's import
            # path (a folder named borg or vbremote there must not be imported).
            self._process = subprocess.Popen(
                [sys.executable, "-P", "-c", (_EARLY_START if serve_command is not None else "") + _WORKER_PROGRAM],
                stdin=request_read,
                stdout=reply_write,
                stderr=subprocess.PIPE,
                env=child_env,
                # No controlling terminal: nothing borg or ssh does can prompt on it.
                start_new_session=True,
                pass_fds=pass_fds,
            )
        except OSError as exc:
            for fd in (request_read, request_write, reply_read, reply_write):
                os.close(fd)
            raise _errors.RepositoryError(f"cannot start the borg worker: {exc}", location=location) from exc
        finally:
            with contextlib.suppress(OSError):
                os.close(request_read)
                os.close(reply_write)
        self._requests = Connection(request_write, readable=False)
        self._replies = Connection(reply_read, writable=False)
        self._stderr_reader = threading.Thread(
            target=self._read_stderr, name="vbremote-borg-stderr", daemon=True
        )
        self._stderr_reader.start()

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

        An exception raised by ``progress`` cancels the operation (the worker
        rolls back; the repository stays usable) and is re-raised. An
        interrupt while this waits on the worker kills the worker and closes
        the repository.

        Raises:
            RepositoryBusy: This thread is already using the repository.
            RepositoryError: The repository is closed, or the worker failed.
        """
        with self._turn():
            return self._call_held(op, progress, kwargs)

    def _call_held(self, op: str, progress: ProgressCallback | None, kwargs: Mapping[str, Any]) -> Any:
        request_id = self._send(op, kwargs)
        try:
            return self._finish(request_id, progress)
        finally:
            if self._in_flight is not None:
                # Stopped while waiting on the worker: the rest of its replies
                # cannot be told from the next call's, so the worker goes.
                because = f"a call to {op!r} was interrupted"
                if self._committing:
                    name = kwargs.get("name")
                    because += (
                        f" after borg was told to commit archive {name!r}, which may or may not exist now"
                        if op == "write" and name
                        else " after borg was told to commit; the change may or may not have been committed"
                    )
                self._kill(because)

    def stream(self, op: str, **kwargs: Any) -> WorkerStream:
        """Start an operation that streams items; iterate the result, then close it.

        The repository is busy for this thread until the stream is exhausted
        or closed; closing it early cancels the operation in the worker.
        """
        self._acquire()
        try:
            request_id = self._send(op, kwargs)
        except BaseException:
            self._release()
            raise
        self._stream = WorkerStream(self, request_id, op)
        return self._stream

    def _finish(self, request_id: int, progress: ProgressCallback | None) -> Any:
        committing = False
        while True:
            reply = self._receive(request_id)
            if reply.kind == _protocol.PROGRESS:
                if progress is not None and not committing:
                    try:
                        progress(*reply.payload)
                    except BaseException:
                        self._cancel(request_id)
                        raise
            elif reply.kind == _protocol.COMMIT:
                # From here on no callback runs for this call: nothing can cancel it.
                committing = self._committing = True
                self._post(_protocol.Decision(request_id, True))
            elif reply.kind in _protocol.FINAL:
                return self._final(reply, cancelled=False)
            else:
                raise self._out_of_step(f"a {reply.kind!r} reply to a call")

    def _final(self, reply: _protocol.Reply, *, cancelled: bool) -> Any:
        """The result of a final reply (the request is over), or its error raised."""
        self._in_flight = None
        if reply.kind == _protocol.OK:
            return reply.payload
        kind, message, context = reply.payload
        if kind == _protocol.CANCELLED and not cancelled:
            raise self._out_of_step("a cancelled reply to a request that was not cancelled")
        raise self._error(kind, message, context)

    def _cancel(self, request_id: int) -> None:
        """Cancel the request in flight and read its replies up to the final one.

        If that fails the request stays in flight, and the caller's cleanup kills the worker.
        """
        with contextlib.suppress(_errors.RepositoryError):
            self._post(_protocol.Cancel(request_id))
            while True:
                reply = self._receive(request_id)
                if reply.kind == _protocol.COMMIT:
                    self._post(_protocol.Decision(request_id, False))
                elif reply.kind in _protocol.FINAL:
                    self._in_flight = None
                    return

    def _send(self, op: str, kwargs: Mapping[str, Any]) -> int:
        if self._closed:
            because = f": {self._closed_because}" if self._closed_because else ""
            raise _errors.RepositoryError(f"the repository is closed{because}", location=self.location)
        request_id = next(self._ids)
        self._in_flight = request_id
        self._committing = False
        self._post(_protocol.Request(request_id, op, dict(kwargs)))
        return request_id

    def _post(self, message: Any) -> None:
        try:
            self._requests.send(message)
        except OSError as exc:
            raise self._died() from exc

    def _receive(self, request_id: int) -> _protocol.Reply:
        """The next reply to ``request_id`` that is not a log record."""
        while True:
            try:
                message = self._replies.recv()
            except (EOFError, OSError) as exc:
                raise self._died() from exc
            if not isinstance(message, _protocol.Reply):
                raise self._out_of_step(f"a {type(message).__name__} where a reply was due")
            if message.id != request_id:
                raise self._out_of_step(
                    f"a reply to request {message.id} ({message.kind}) while request {request_id} was waiting"
                )
            if message.kind == _protocol.DATA:
                head, position, size = message.payload
                data = self._read_data(size)
                return _protocol.Reply(message.id, _protocol.ITEM, (*head[:position], data, *head[position + 1 :]))
            if message.kind != _protocol.LOG:
                return message
            level, name, text = message.payload
            logger_name = name if name.startswith("vbremote.") else "vbremote.borg." + name
            logging.getLogger(logger_name).log(level, "%s", text)

    def _read_data(self, size: int) -> bytes:
        """The ``size`` raw bytes that follow a ``data`` reply (one copy: the pipe's into a new bytes)."""
        fd = self._replies.fileno()
        try:
            data = os.read(fd, size)
            if len(data) < size:
                parts = [data]
                got = len(data)
                while data and got < size:
                    data = os.read(fd, size - got)
                    parts.append(data)
                    got += len(data)
                data = b"".join(parts)
        except OSError as exc:
            raise self._died() from exc
        if len(data) < size:
            raise self._died()
        return data

    def _out_of_step(self, what: str) -> _errors.RepositoryError:
        self._kill("the borg worker fell out of step")
        return _errors.RepositoryError(
            f"internal error: the borg worker sent {what}; vbremote and the worker are out of step, "
            "so the repository was closed (nothing uncommitted was kept); open it again",
            location=self.location,
        )

    def _error(self, kind: str, message: str, context: Mapping[str, Any]) -> _errors.VBRemoteError:
        if kind == "config":
            return _errors.ConfigurationError(message)
        cls = _ERRORS.get(kind)
        if cls is _errors.IntegrityError:
            return _errors.IntegrityError(message, location=self.location, chunk_id=context.get("chunk_id"))
        if cls is _errors.ArchiveNotFound or cls is _errors.ArchiveExists or cls is _errors.ArchiveInvalid:
            return cls(message, location=self.location, archive=context.get("archive", ""))
        if cls is _errors.FileNotInArchive:
            return _errors.FileNotInArchive(
                message, location=self.location, archive=context.get("archive", ""), path=context.get("path", "")
            )
        if cls is _errors.PassphraseWrong:
            # borg's own text names its environment variables, which the caller may never have set.
            return _errors.PassphraseWrong(
                f"the passphrase does not unlock the key of the repository at {self.location}"
                " (the one given as passphrase=, or from BORG_PASSPHRASE, BORG_PASSCOMMAND or BORG_PASSPHRASE_FD)",
                location=self.location,
            )
        if cls is not None:
            return cls(message, location=self.location)
        return _errors.BorgError(message, location=self.location, borg_class=context.get("borg_class", ""))

    def _died(self) -> _errors.RepositoryError:
        self._reap()
        self._closed_because = self._closed_because or "the borg worker ended"
        tail = " | ".join(list(self._stderr)[-5:])
        return _errors.RepositoryError(
            f"the borg worker ended unexpectedly (exit code {self._process.returncode})"
            f"{': ' + tail if tail else ''}",
            location=self.location,
        )

    # -- taking turns -----------------------------------------------------

    @contextlib.contextmanager
    def _turn(self) -> Iterator[None]:
        self._acquire()
        try:
            yield
        finally:
            self._release()

    def _acquire(self) -> None:
        # Only this thread can have set _owner to its own id, so reading it unlocked is safe.
        if self._owner == threading.get_ident():
            raise _errors.RepositoryBusy(
                "the repository is already in use by this thread (an open fetch stream, or a call"
                " from inside a progress callback); finish that first",
                location=self.location,
            )
        self._lock.acquire()
        self._owner = threading.get_ident()

    def _release(self) -> None:
        self._owner = None
        self._lock.release()

    # -- closing ----------------------------------------------------------

    def close(self) -> None:
        """Ask the worker to close the repository (releasing its lock) and wait for it.

        A stream that this thread left open is cancelled first; other threads' calls are waited for.
        """
        stream = self._stream
        if stream is not None and self._owner == threading.get_ident():
            stream.close()
        if self._closed:
            return
        with self._turn():
            if self._closed:
                return
            try:
                self._call_held("close", None, {})
            except _errors.RepositoryError:
                pass  # a worker that is already gone has released its lock with its process
            finally:
                self._reap()

    def _kill(self, because: str) -> None:
        if not self._closed:
            self._closed_because = f"{because}; open it again"
            _log.debug("borg worker for %s killed: %s", self.location, because)
        with contextlib.suppress(OSError):
            self._process.kill()
        self._reap()

    def abandon(self) -> None:
        """After a failed open: reap the worker, which has already exited."""
        self._reap()

    def _reap(self) -> None:
        self._closed = True
        self._in_flight = None
        for connection in (self._requests, self._replies):
            with contextlib.suppress(OSError):
                connection.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._stderr_reader.join(timeout=5)
        if self._process.stderr is not None:
            self._process.stderr.close()


class WorkerStream:
    """The items of one streaming operation, read as they are iterated.

    Use it as a context manager: leaving the block before the end cancels the
    operation in the worker and reads what was already on its way, so the
    repository stays in step. An interrupt while it waits on the worker
    closes the repository instead.
    """

    def __init__(self, worker: BorgWorker, request_id: int, op: str) -> None:
        self._worker = worker
        self._id = request_id
        self._op = op
        self._done = False

    def __iter__(self) -> WorkerStream:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        worker = self._worker
        try:
            while True:
                reply = worker._receive(self._id)
                if reply.kind == _protocol.ITEM:
                    return reply.payload
                if reply.kind in _protocol.FINAL:
                    worker._final(reply, cancelled=False)
                    raise StopIteration
                if reply.kind != _protocol.PROGRESS:
                    raise worker._out_of_step(f"a {reply.kind!r} reply to a stream")
        except BaseException:
            self._end()
            raise

    def close(self) -> None:
        """Stop the stream: cancel the operation if it is still running (idempotent)."""
        if self._done:
            return
        try:
            if self._worker._in_flight == self._id:
                self._worker._cancel(self._id)
        finally:
            # Still in flight (the cancel failed, or an interrupt landed in it): the worker goes.
            self._end()

    def _end(self) -> None:
        if self._done:
            return
        self._done = True
        worker = self._worker
        if worker._in_flight == self._id:
            worker._kill(f"a {self._op!r} stream was interrupted")
        worker._stream = None
        worker._release()

    def __enter__(self) -> WorkerStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
