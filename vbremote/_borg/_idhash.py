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

import bisect
import hashlib
import hmac
import itertools
import os
import queue
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

    def copy(self) -> _Hash: ...


@frozen
class IdHasher:
    """The id function of one repository key.

    Attributes:
        algorithm: One of :data:`ALGORITHMS`.
    """

    algorithm: str
    _key: bytes = field(repr=False, alias="key")
    _zero_ids: dict[int, bytes] = field(factory=dict, init=False, eq=False, repr=False)
    _zero_states: dict[int, _Hash] = field(factory=dict, init=False, eq=False, repr=False)
    _zero_sizes: list[int] = field(factory=list, init=False, eq=False, repr=False)
    _zero_lock: threading.Lock = field(factory=threading.Lock, init=False, eq=False, repr=False)

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
        """The id of ``size`` zero bytes.

        Each size is hashed once, then remembered. The hash state after each
        size is kept too, so a larger size goes on from the largest smaller one
        already done: the zero ids of all the sizes of an archive (a
        content-defined chunker makes nearly every chunk's size distinct) cost
        about one pass over the largest, when asked for in ascending order.
        """
        known = self._zero_ids.get(size)
        if known is not None:
            return known
        with self._zero_lock:
            known = self._zero_ids.get(size)
            if known is not None:
                return known
            at = bisect.bisect_right(self._zero_sizes, size) - 1
            if at >= 0:
                done = self._zero_sizes[at]
                h = self._zero_states[done].copy()
            else:
                done, h = 0, self.new()
            while done < size:
                piece = min(size - done, _PIECE)
                h.update(_ZERO[:piece])
                done += piece
            bisect.insort(self._zero_sizes, size)
            self._zero_states[size] = h.copy()
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

    Each thread reads into a buffer of its own and hashes it there, taking the
    next range from a shared cursor: no allocation per range, and nothing to
    coordinate but a byte budget.

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
    todo = [i for i, (offset, size) in enumerate(ranges) if offset + size <= file_size]
    if not todo:
        return results
    budget = Budget(read_ahead, meter)
    cursor = itertools.count()
    stop = threading.Event()
    finished: queue.SimpleQueue[int | BaseException | None] = queue.SimpleQueue()
    buffer_size = min(_PIECE, max(ranges[i][1] for i in todo))

    def read(view: memoryview, offset: int) -> bool:
        """Fill ``view`` from ``offset``; False if the file ends first."""
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                return False
            done += n
        return True

    def one(view: memoryview, offset: int, size: int) -> bytes | None:
        if size <= _PIECE:
            data = view[:size]
            budget.take(size)
            try:
                if not read(data, offset):
                    return None
                return hasher.zero_id(size) if _ZERO.startswith(data) else hasher(data)
            finally:
                budget.give(size)
        h = hasher.new()
        zero = True
        done = 0
        while done < size:
            piece = min(_PIECE, size - done)
            data = view[:piece]
            budget.take(piece)
            try:
                if not read(data, offset + done):
                    return None
                zero = zero and _ZERO.startswith(data)
                h.update(data)  # type: ignore[arg-type]
            finally:
                budget.give(piece)
            done += piece
        return hasher.zero_id(size) if zero else h.digest()

    def run() -> None:
        view = memoryview(bytearray(buffer_size))
        try:
            while not stop.is_set():
                k = next(cursor)
                if k >= len(todo):
                    break
                index = todo[k]
                offset, size = ranges[index]
                results[index] = one(view, offset, size)
                finished.put(size)
        except BaseException as exc:  # handed to the calling thread
            stop.set()
            finished.put(exc)
        finally:
            finished.put(None)

    workers = min(max(2, os.cpu_count() or 2), len(todo))
    threads = [threading.Thread(target=run, name="vbremote-hash", daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    hashed = 0
    running = workers
    try:
        while running:
            item = finished.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                hashed += item
                if progress is not None:
                    progress(hashed)
    finally:
        stop.set()
        budget.close()
        for thread in threads:
            thread.join()  # the fd must outlive every read
    return results


class Budget:
    """Bytes in flight (read and not yet hashed, or decrypted and not yet
    sent), kept at or under a limit (one piece may always go); counted on
    ``meter`` too when one is given."""

    def __init__(self, limit: int, meter: ReadAheadMeter | None = None) -> None:
        self.limit = limit
        self.meter = meter
        self.held = 0
        self.closed = False
        self.changed = threading.Condition()

    def take(self, size: int) -> None:
        with self.changed:
            while self.held and self.held + size > self.limit and not self.closed:
                self.changed.wait()
            self.held += size
        if self.meter is not None:
            self.meter.take(size)

    def give(self, size: int) -> None:
        if self.meter is not None:
            self.meter.give(size)
        with self.changed:
            self.held -= size
            self.changed.notify()

    def close(self) -> None:
        """Let every waiting thread go on (to find the stop flag)."""
        with self.changed:
            self.closed = True
            self.changed.notify_all()


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
