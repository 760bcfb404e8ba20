"""Broken third-party transports for the conformance check's own tests.

They live in a module of their own, not in a test module, because the borg
worker process imports a transport's class by module path: the tests put
this folder on ``PYTHONPATH`` for the worker (see ``worker_imports_tests``).
"""

from __future__ import annotations

from attrs import frozen

import vbremote


@frozen
class NoServeTransport(vbremote.Transport):
    """A transport whose command exits at once instead of running borg serve."""

    repo: str

    @property
    def path(self) -> str:
        return self.repo

    @property
    def location(self) -> str:
        return "no-serve::" + self.repo

    def serve_command(self) -> list[str]:
        return ["sh", "-c", "echo 'no borg here' >&2; exit 0"]


@frozen
class LockBreakingTransport(vbremote.Transport):
    """Reaches borg serve, but its wrapper "cleans up stale locks" on every connect.

    A second client then gets in while the first holds the exclusive lock:
    exactly what the conformance check's lock step must catch.
    """

    repo: str
    borg: str

    @property
    def path(self) -> str:
        return self.repo

    @property
    def location(self) -> str:
        return "lock-breaking::" + self.repo

    def serve_command(self) -> list[str]:
        script = 'rm -rf "$1/lock.exclusive" "$1/lock.roster"; exec "$2" serve'
        return ["sh", "-c", script, "sh", self.repo, self.borg]
