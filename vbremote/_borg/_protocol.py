"""The messages between vbremote and its borg worker process.

Frames are :class:`multiprocessing.connection.Connection` messages (a
length header and a pickle) over the worker's private pipes. Both ends are
vbremote's own code, started by the same user, so pickle is safe here and
keeps values (bytes, tuples, datetimes) intact.

One request is in flight at a time. The parent sends a :class:`Request`;
the worker answers with :class:`Reply` frames that all carry the request's
id: any number of ``log``, ``progress``, ``item`` and ``data`` replies, at most one
``commit`` (the worker is about to commit and waits for a
:class:`Decision`), and one final ``ok`` or ``error``. While the request runs
the parent may send :class:`Cancel`; the worker then stops at its next
check, rolls back, and answers ``error`` of kind ``cancelled``. A reply with
another id means the two ends fell out of step: the parent kills the worker.
"""

from __future__ import annotations

from typing import Any

from attrs import frozen

# Reply kinds.
LOG = "log"  # payload: (levelno, logger name, message)
PROGRESS = "progress"  # payload: (operation, path, done, total)
ITEM = "item"  # payload: one element of a streamed result
# payload: (item, position, size): an element of a streamed result, a tuple whose element at
# ``position`` is bytes that follow this frame raw, ``size`` of them (no pickling, no extra copy).
DATA = "data"
COMMIT = "commit"  # payload: None; the worker waits for a Decision
OK = "ok"  # payload: the result; final
ERROR = "error"  # payload: (kind, message, context dict); final

FINAL = frozenset({OK, ERROR})

#: The error kind of a request that stopped because the parent cancelled it.
CANCELLED = "cancelled"


@frozen
class Request:
    """Run ``op`` with keyword arguments ``args``; ``id`` is new for each request."""

    id: int
    op: str
    args: dict[str, Any]


@frozen
class Cancel:
    """Stop request ``id`` at the next check and roll back; ignored once it has ended."""

    id: int


@frozen
class Decision:
    """The answer to a ``commit`` reply: commit (``go``) or roll back."""

    id: int
    go: bool


@frozen
class Reply:
    """One answer to request ``id``."""

    id: int
    kind: str
    payload: Any
