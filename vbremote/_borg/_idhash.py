"""borg's chunk id functions, computed in vbremote's own process.

A chunk's id is the repository key's keyed hash of its plaintext. The worker
process (which imports borg) hands over the id key once, when the repository
is opened; from then on ids are computed here, in threads, while the worker
is free to fetch or store. This module does not import borg: it reimplements
the three id constructions of borg 1.4 (``src/borg/crypto/key.py``, classes
``ID_HMAC_SHA_256``, ``ID_BLAKE2b_256`` and ``PlaintextKey``, and the helpers
``hmac_sha256`` and ``blake2b_256`` of ``src/borg/crypto/low_level.pyx``):

- ``repokey``, ``keyfile``, ``authenticated``: HMAC-SHA256 keyed with the
  key's 32-byte ``id_key``;
- ``repokey-blake2``, ``keyfile-blake2``, ``authenticated-blake2``: an
  unkeyed BLAKE2b with a 32-byte digest over ``id_key`` (128 bytes: 64
  random, 64 zero, one full BLAKE2b block) followed by the data;
- ``none``: plain SHA-256 of the data.

The worker also sends the id of a probe text computed by borg itself, and
:meth:`IdHasher.from_worker` refuses to go on if ours differs: a change of
construction in a future borg fails at open, not as wrong ids later.

hashlib and hmac release the GIL while they hash a large buffer, and
``os.pread`` releases it while it reads, so threads hash in parallel.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import os
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from attrs import define, field, frozen

__all__ = [
    "ALGORITHMS",
    "DEFAULT_READ_AHEAD",
    "PROBE",
    "IdHasher",
    "ReadAheadMeter",
    "fixed_ranges",
    "hash_ranges",
]

#: The id constructions, by the names the worker sends.
ALGORITHMS = ("hmac-sha256", "blake2b-256", "sha256")

#: Bytes read ahead of their use (by hashing, and by the worker's writes)
#: unless the repository is opened with another limit: independent of the
#: number of CPUs, so a large host does not hold gigabytes in flight.
DEFAULT_READ_AHEAD = 256 << 20

#: The text whose id the worker computes with borg, to check ours against.
PROBE = b"vbremote id hash probe"

# Ranges larger than this are read and hashed in pieces, so one huge range
# (another tool's chunker may cut large chunks) never needs its size in memory.
_PIECE = 8 << 20

_ZERO = bytes(_PIECE)


class _Hash(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def digest(self) -> bytes: ...


@frozen
class IdHasher:
    """The id function of one repository key.

    Attributes:
        algorithm: One of :data:`ALGORITHMS`.
    """

    algorithm: str
    _key: bytes = field(repr=False, alias="key")
    _zero_ids: dict[int, bytes] = field(factory=dict, init=False, eq=False, repr=False)

    @classmethod
    def from_worker(cls, algorithm: str, key: bytes, probe_id: bytes) -> IdHasher:
        """The hasher described by the worker, checked against borg's id of :data:`PROBE`.

        Raises:
            ValueError: An unknown algorithm, a key of the wrong length, or an id
                of the probe that differs from borg's.
        """
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown id hash {algorithm!r}")
        expected_key = {"hmac-sha256": 32, "blake2b-256": 128, "sha256": 0}[algorithm]
        if len(key) != expected_key:
            raise ValueError(f"an id key for {algorithm} has {expected_key} bytes, not {len(key)}")
        hasher = cls(algorithm, key=bytes(key))
        if hasher(PROBE) != probe_id:
            raise ValueError(f"the {algorithm} id computed here differs from borg's")
        return hasher

    def __call__(self, data: bytes | memoryview) -> bytes:
        """The id of ``data``."""
        if self.algorithm == "hmac-sha256":
            return hmac.digest(self._key, data, "sha256")
        h = self.new()
        h.update(data)  # type: ignore[arg-type]
        return h.digest()

    def new(self) -> _Hash:
        """An incremental hash object (``update``, ``digest``) giving the same id."""
        if self.algorithm == "hmac-sha256":
            return hmac.new(self._key, digestmod="sha256")
        if self.algorithm == "blake2b-256":
            h = hashlib.blake2b(digest_size=32)
            h.update(self._key)
            return h
        return hashlib.sha256()

    def zero_id(self, size: int) -> bytes:
        """The id of ``size`` zero bytes."""
        known = self._zero_ids.get(size)
        if known is not None:
            return known
        h = self.new()
        left = size
        while left:
            piece = min(left, _PIECE)
            h.update(_ZERO[:piece])
            left -= piece
        digest = self._zero_ids[size] = h.digest()
        return digest


@define(eq=False)
class ReadAheadMeter:
    """Counts the bytes read ahead and not yet released, and their peak.

    The limit is enforced by the code that reads ahead; this only measures,
    so that tests and benchmarks can see the limit kept.
    """

    held: int = 0
    peak: int = 0
    _lock: threading.Lock = field(factory=threading.Lock, repr=False)

    def take(self, size: int) -> None:
        with self._lock:
            self.held += size
            self.peak = max(self.peak, self.held)

    def give(self, size: int) -> None:
        with self._lock:
            self.held -= size


def hash_ranges(
    hasher: IdHasher,
    fd: int,
    ranges: Sequence[tuple[int, int]],
    *,
    read_ahead: int,
    meter: ReadAheadMeter,
    progress: Callable[[int], None] | None = None,
) -> list[bytes | None]:
    """The ids of ``(offset, size)`` ranges of an open file, hashed in parallel threads.

    At most ``read_ahead`` bytes are read and not yet hashed at any time
    (always at least one range, in pieces of at most 8 MiB). A range that
    reaches past the end of the file (or that the file no longer has when it
    is read) has no id: ``None``. All-zero data is recognised and not hashed.

    Args:
        hasher: The key's id function.
        fd: A file descriptor open for reading.
        ranges: ``(offset, size)`` pairs, offsets >= 0 and sizes > 0.
        read_ahead: The byte limit of data in memory.
        meter: Measures what is held.
        progress: Called in this thread with the bytes hashed so far.

    Returns:
        One id (or ``None``) per range, in the order given.
    """
    file_size = os.fstat(fd).st_size
    results: list[bytes | None] = [None] * len(ranges)

    def job(offset: int, size: int) -> bytes | None:
        if size <= _PIECE:
            data = os.pread(fd, size, offset)
            if len(data) != size:
                return None
            return hasher.zero_id(size) if _ZERO.startswith(data) else hasher(data)
        h = hasher.new()
        zero = True
        done = 0
        while done < size:
            piece = min(_PIECE, size - done)
            data = os.pread(fd, piece, offset + done)
            if len(data) != piece:
                return None
            zero = zero and _ZERO.startswith(data)
            h.update(data)
            done += piece
        return hasher.zero_id(size) if zero else h.digest()

    workers = max(2, os.cpu_count() or 2)
    pending: dict[concurrent.futures.Future[bytes | None], tuple[int, int]] = {}
    held = 0
    hashed = 0

    def settle(block: bool) -> None:
        nonlocal held, hashed
        done, _ = concurrent.futures.wait(
            pending, return_when=concurrent.futures.FIRST_COMPLETED if block else concurrent.futures.ALL_COMPLETED,
            timeout=None if block else 0,
        )
        for future in done:
            index, cost = pending.pop(future)
            results[index] = future.result()
            held -= cost
            meter.give(cost)
            hashed += ranges[index][1]
        if done and progress is not None:
            progress(hashed)

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vbremote-hash") as pool:
        try:
            for index, (offset, size) in enumerate(ranges):
                if offset + size > file_size:
                    continue  # missing: nothing to read
                cost = min(size, _PIECE)
                while pending and held + cost > read_ahead:
                    settle(block=True)
                held += cost
                meter.take(cost)
                pending[pool.submit(job, offset, size)] = (index, cost)
                settle(block=False)
            while pending:
                settle(block=True)
        finally:
            for future in pending:
                future.cancel()
            for future, (_, cost) in list(pending.items()):
                if not future.cancelled():
                    future.exception()  # wait: the fd must outlive every read
                meter.give(cost)
    return results


def fixed_ranges(size: int, block_size: int, header_size: int = 0) -> list[tuple[int, int]]:
    """The ``(offset, size)`` of each chunk of a ``size``-byte file, as borg's fixed chunker cuts it."""
    ranges = []
    offset = 0
    if header_size and size:
        offset = min(header_size, size)
        ranges.append((0, offset))
    while offset < size:
        length = min(block_size, size - offset)
        ranges.append((offset, length))
        offset += length
    return ranges
