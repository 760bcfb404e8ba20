"""Framing between vbremote and its borg worker process.

Each message is a 4-byte little-endian length and a pickle. Both ends are
vbremote's own code, started by the same user over private pipes, so pickle
is safe here and keeps values (bytes, tuples, datetimes) intact.
"""

from __future__ import annotations

import pickle
import struct
from typing import IO, Any

_HEADER = struct.Struct("<I")

# What the worker sends back, as the first element of each message.
LOG = "log"  # (LOG, levelno, logger name, message)
PROGRESS = "progress"  # (PROGRESS, operation, path, done, total)
ITEM = "item"  # (ITEM, value): one element of a streamed result
OK = "ok"  # (OK, value): the call finished
ERROR = "error"  # (ERROR, kind, message, context dict)


def send(stream: IO[bytes], message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)))
    stream.write(data)
    stream.flush()


def receive(stream: IO[bytes]) -> Any:
    """Read one message; raises EOFError when the other side is gone."""
    header = _read_exactly(stream, _HEADER.size)
    (length,) = _HEADER.unpack(header)
    return pickle.loads(_read_exactly(stream, length))


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    parts = []
    while size:
        part = stream.read(size)
        if not part:
            raise EOFError("the other end of the borg worker pipe closed")
        parts.append(part)
        size -= len(part)
    return b"".join(parts)
