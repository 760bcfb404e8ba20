"""Monitoring: healthchecks-style pings and hook commands around a command run.

A run sends ``start``, then ``success`` or ``failure``. For each event:

- the command's ping URL (``[pings] COMMAND = URL``) gets a POST, as
  healthchecks.io expects: ``URL/start``, ``URL`` and ``URL/fail`` (with the
  error's text as the body);
- every hook (``[[hooks]]``) that wants the command and event runs with a
  JSON document on its standard input (as borgmatic's hooks do), and is killed
  after its timeout.

A ping or hook that fails or hangs is reported on stderr; it never changes
the command's own result or exit code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from attrs import define, field

from .._config import Config, Hook

__all__ = ["Run", "monitored"]

log = logging.getLogger("vbremote.cli.monitor")


@define(eq=False)
class Run:
    """One monitored command run.

    Attributes:
        command: The command's name.
        config: The config (pings and hooks).
        warn: Where problems of pings and hooks are reported.
        details: What the run is about (repository, VMs), sent with every event.
        result: The command's JSON result, set by the command before it succeeds.
    """

    command: str
    config: Config
    warn: Callable[[str], None]
    details: dict[str, Any] = field(factory=dict)
    result: dict[str, Any] | None = None

    def event(self, event: str, *, error: str | None = None, exit_code: int | None = None) -> None:
        """Send one event to the ping URL and the hooks that want it."""
        document = {
            "event": event,
            "command": self.command,
            "time": datetime.now(UTC).isoformat(),
            "error": error,
            "exit_code": exit_code,
            "result": self.result if event == "success" else None,
            **self.details,
        }
        self._ping(event, error)
        for hook in self.config.hooks:
            if hook.wants(self.command, event):
                self._hook(hook, document)

    def _ping(self, event: str, error: str | None) -> None:
        base = self.config.pings.urls.get(self.command)
        if base is None:
            return
        url = {"start": f"{base}/start", "success": base, "failure": f"{base}/fail"}[event]
        body = (error or "").encode("utf-8", errors="replace")
        request = urllib.request.Request(url, data=body, method="POST", headers={"User-Agent": "vbremote"})
        try:
            with urllib.request.urlopen(request, timeout=self.config.pings.timeout) as response:
                response.read()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            self.warn(f"the {event} ping to {url} failed: {getattr(exc, 'reason', exc)}")

    def _hook(self, hook: Hook, document: dict[str, Any]) -> None:
        name = " ".join(hook.command)
        payload = json.dumps(document, sort_keys=True).encode("utf-8")
        try:
            # Its own session, so a timeout kills everything it started; its output goes to
            # stderr, so stdout stays the command's alone (--json).
            process = subprocess.Popen(
                hook.command,
                stdin=subprocess.PIPE,
                stdout=sys.stderr.fileno(),
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            self.warn(f"the {document['event']} hook {name!r} could not start: {exc.strerror or exc}")
            return
        try:
            _, stderr = process.communicate(payload, timeout=hook.timeout)
        except subprocess.TimeoutExpired:
            _kill(process)
            self.warn(f"the {document['event']} hook {name!r} did not finish within {hook.timeout:g} s and was killed")
            return
        except BaseException:
            # Interrupted (Ctrl-C): the hook runs in its own session and would outlive the command.
            _kill(process)
            raise
        if process.returncode != 0:
            words = stderr.decode("utf-8", errors="replace").strip().splitlines()[-1:] or [""]
            self.warn(f"the {document['event']} hook {name!r} failed with exit code {process.returncode}: {words[0]}")


def _kill(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.communicate()


@contextlib.contextmanager
def monitored(
    command: str,
    config: Config,
    warn: Callable[[str], None],
    exit_code_for: Callable[[BaseException], int],
    **details: Any,
) -> Iterator[Run]:
    """Send ``start`` now, then ``success`` when the block ends or ``failure`` when it raises (re-raised).

    Args:
        command: The command's name.
        config: The config with the pings and hooks.
        warn: Where problems of pings and hooks are reported.
        exit_code_for: The exit code an error will give (sent with ``failure``).
        details: What the run is about, sent with every event.

    Yields:
        The run; set ``result`` to send the command's JSON result with ``success``.
    """
    run = Run(command, config, warn, details)
    run.event("start")
    try:
        yield run
    except BaseException as exc:
        text = str(exc) or type(exc).__name__
        run.event("failure", error=text, exit_code=exit_code_for(exc))
        raise
    run.event("success", exit_code=0)
