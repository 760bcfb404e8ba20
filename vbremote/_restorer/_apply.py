"""Applying a restore plan: copy, fetch, write in place, journal, size, verify.

The order is what makes it safe to kill at any instant:

1. The journal is replaced first by one for this plan (keeping what an
   interrupted run of the same plan recorded), so a journal never describes
   blocks of another archive that this run overwrites.
2. Copies from local data go first, each read, checked against its id and
   written; a copy whose source no longer holds the data (it was itself
   overwritten) is fetched instead. Copies are ordered so that a block is read
   before another copy overwrites it. The one fetch stream is opened before
   the copies start, so a remote repository is already sending meanwhile.
3. All-zero blocks inside the existing data are punched out as holes (zeros
   are written where the file system cannot punch).
4. Fetched chunks are written at every offset that needs them.
5. Every :data:`JOURNAL_EVERY_BYTES` bytes, or every :data:`JOURNAL_EVERY_SECONDS`
   seconds once :data:`JOURNAL_MIN_BYTES` were written, the written files are
   fsynced and only then the journal records those blocks.
6. Each file is cut or extended to its final size, fsynced; then the blocks
   are verified; then the journal is removed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import errno
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from queue import Queue
from typing import TYPE_CHECKING, Literal

from attrs import frozen

from .._errors import ConfigurationError, IntegrityError, RestoreError, TargetSpaceError
from .._models import ChunkRef, Progress
from ._journal import RestoreFileState, RestoreState, coalesce, remove_journal, subtract
from ._plan import BlockAction, RestorePlan, distinct_fetches, target_file

if TYPE_CHECKING:
    from .._repository import FetchedChunk, Repository

__all__ = [
    "JOURNAL_EVERY_BYTES", "JOURNAL_EVERY_SECONDS", "JOURNAL_MIN_BYTES", "PREFETCH_BYTES", "ApplyStats", "Prefetch",
    "apply_plan",
]

JOURNAL_EVERY_BYTES = 64 * 1024 * 1024
"""The journal is brought up to date after at most this many bytes written…"""

JOURNAL_EVERY_SECONDS = 0.5
"""…or this many seconds, once at least :data:`JOURNAL_MIN_BYTES` wait: over a slow link a
batch is then a fraction of a second of transfer, while a fast local restore is still journaled
every :data:`JOURNAL_EVERY_BYTES`."""

JOURNAL_MIN_BYTES = 1024 * 1024
"""The least a batch holds before time alone brings the journal up to date (no fsync and rewrite
of the journal for a few KiB on a very slow link)."""

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_ZEROS = bytes(1024 * 1024)
_WRITES_IN_FLIGHT = 2  # fetched chunks waiting for the writer thread, at most

PREFETCH_BYTES = 16 * 1024 * 1024
"""A :class:`Prefetch` keeps at most this many bytes fetched and not yet written."""

Verify = Literal["written", "full", "none"]


@frozen
class ApplyStats:
    """What applying a plan did.

    Attributes:
        bytes_fetched: Bytes of chunks fetched from the repository (each distinct chunk once).
        bytes_copied: Bytes copied from local data.
        bytes_written: Bytes of data written into target files (copies and fetched chunks, at every offset).
        bytes_zero: Bytes of all-zero blocks made holes (or written as zeros) in existing data.
        chunks_fetched: Distinct chunks fetched.
        bytes_verified: Bytes read back and hashed by the verification.
        seconds: Wall time of the apply.
        resumed: Whether an interrupted restore of the same archive was continued.
    """

    bytes_fetched: int
    bytes_copied: int
    bytes_written: int
    bytes_zero: int
    chunks_fetched: int
    bytes_verified: int
    seconds: float
    resumed: bool


class Prefetch:
    """A fetch started while the plan is still hashing, taken over by :func:`apply_plan`.

    Pass it as ``fetch_known`` to :func:`make_plan`: the first time the plan
    knows chunks it will certainly fetch, a thread starts fetching them (each
    distinct id once) and keeps at most :data:`PREFETCH_BYTES` of their data
    waiting; the worker and the link stay busy while the rest is hashed.
    Then pass it to :func:`apply_plan`, which writes those chunks first, as
    they come, and fetches the rest after. Nothing is written before the
    apply; the data waiting is only in memory. Use it as a context manager:
    leaving it stops the fetch.
    """

    def __init__(self, repository: Repository, *, limit: int = 0) -> None:
        self.repository = repository
        self.limit = limit or PREFETCH_BYTES
        self.ids: tuple[bytes, ...] = ()
        self._waiting: deque[FetchedChunk | None] = deque()
        self._held = 0
        self._stop = False
        self._changed = threading.Condition()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, chunks: list[ChunkRef]) -> None:
        """Start fetching ``chunks`` (the first call only: one stream at a time)."""
        if self._thread is not None or self._stop or not chunks:
            return
        self.ids = tuple(dict.fromkeys(c.id for c in chunks))
        self._thread = threading.Thread(target=self._run, name="vbremote-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with self.repository.fetch(self.ids, errors="report") as stream:
                for chunk in stream:
                    with self._changed:
                        while self._held and self._held + len(chunk.data) > self.limit and not self._stop:
                            self._changed.wait()
                        if self._stop:
                            return
                        self._held += len(chunk.data)
                        self._waiting.append(chunk)
                        self._changed.notify_all()
        except BaseException as exc:  # raised to the apply, in its thread
            self._error = exc
        finally:
            with self._changed:
                self._waiting.append(None)
                self._changed.notify_all()

    def chunks(self) -> Iterator[FetchedChunk]:
        """The fetched chunks in order, as they come; raises what stopped the fetch."""
        if self._thread is None:
            return
        while True:
            with self._changed:
                while not self._waiting:
                    self._changed.wait()
                chunk = self._waiting.popleft()
                if chunk is not None:
                    self._held -= len(chunk.data)
                    self._changed.notify_all()
            if chunk is None:
                break
            yield chunk
        self._thread.join()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop the fetch (what waits is dropped) and wait for its thread (idempotent)."""
        with self._changed:
            self._stop = True
            self._waiting.clear()
            self._held = 0
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join()


class _Punch:
    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._fallocate = getattr(libc, "fallocate", None)
        if self._fallocate is not None:
            self._fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
            self._fallocate.restype = ctypes.c_int

    def __call__(self, fd: int, offset: int, size: int) -> None:
        """Make ``[offset, offset + size)`` read as zeros: a hole where possible, else written zeros."""
        if self._fallocate is not None:
            if self._fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, size) == 0:
                return
            code = ctypes.get_errno()
            if code not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise OSError(code, os.strerror(code))
        end = offset + size
        while offset < end:
            n = os.pwrite(fd, _ZEROS[: min(len(_ZEROS), end - offset)], offset)
            offset += n


class _Applier:
    def __init__(self, repository: Repository, plan: RestorePlan, progress: Callable[[Progress], None] | None) -> None:
        self.repository = repository
        self.plan = plan
        self.progress = progress
        self.target = plan.target
        self.fds: dict[str, int] = {}
        self.done: dict[str, tuple[tuple[int, int], ...]] = {}
        self.pending: list[tuple[str, ChunkRef]] = []
        self.pending_bytes = 0
        self.dirty: set[str] = set()
        self.last_flush = time.monotonic()
        self.verifying = False
        self.sync_failed = False
        self.arrived: set[bytes] = set()  # the ids fetched and handed to the writer
        self.syncer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vbremote-sync")
        self.syncing: concurrent.futures.Future[None] | None = None
        self.verifier = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vbremote-verify")
        self.checks: list[tuple[str, list[ChunkRef], concurrent.futures.Future[list[ChunkRef]]]] = []
        self.source_fds: dict[str, int] = {}
        self.bytes_fetched = self.bytes_copied = self.bytes_written = self.bytes_zero = self.chunks_fetched = 0
        self.punch = _Punch()
        self.total = plan.bytes_to_write
        state = RestoreState.load(self.target) if plan.resumed else None
        for f in plan.files:
            previous = state.file(f.source.target_path) if state is not None else None
            self.done[f.source.target_path] = previous.done if previous is not None else ()
        self.initial_done = dict(self.done)

    # -- journal ----------------------------------------------------------

    def state(self) -> RestoreState:
        return RestoreState(
            archive_id=self.plan.source.archive_id,
            archive=self.plan.source.archive,
            fingerprint=self.plan.fingerprint,
            files=tuple(
                RestoreFileState(f.source.target_path, f.source.size, self.done[f.source.target_path])
                for f in self.plan.files
            ),
        )

    def record(self, path: str, chunk: ChunkRef) -> None:
        """Note a block as written; it is recorded in the journal once it is durable."""
        self.pending.append((path, chunk))
        self.pending_bytes += chunk.size
        self.dirty.add(path)
        if self.pending_bytes >= JOURNAL_EVERY_BYTES or (
            self.pending_bytes >= JOURNAL_MIN_BYTES and time.monotonic() - self.last_flush >= JOURNAL_EVERY_SECONDS
        ):
            # fsync and the journal update run in a thread of their own while the next blocks are
            # written; one batch at a time, so the data not yet durable stays about one batch.
            self.wait_sync()
            batch, dirty = self.take_batch()
            self.syncing = self.syncer.submit(self.sync, batch, dirty)

    def take_batch(self) -> tuple[list[tuple[str, ChunkRef]], set[str]]:
        batch, dirty = self.pending, self.dirty
        self.pending, self.dirty, self.pending_bytes = [], set(), 0
        self.last_flush = time.monotonic()
        return batch, dirty

    def wait_sync(self) -> None:
        """Wait for the batch being made durable (its error is raised here)."""
        if self.syncing is not None:
            syncing, self.syncing = self.syncing, None
            syncing.result()

    def flush(self) -> None:
        """Make every block written so far durable, then record it."""
        self.wait_sync()
        self.sync(*self.take_batch())

    def sync(self, batch: list[tuple[str, ChunkRef]], dirty: set[str]) -> None:
        """fsync the files of a batch, then record its blocks in the journal (and have them read back).

        After an fsync failed, nothing more is ever recorded: Linux may report a
        write-back error once and a later fsync of the same file succeed
        although the pages it failed to write are gone.
        """
        if self.sync_failed:
            raise RestoreError("an earlier fsync of the target failed; nothing more is recorded",
                               archive=self.plan.source.archive)
        try:
            for path in sorted(dirty):
                os.fsync(self.fds[path])
        except BaseException:
            self.sync_failed = True
            raise
        if not batch:
            return
        by_path: dict[str, list[ChunkRef]] = {}
        for path, chunk in batch:
            by_path.setdefault(path, []).append(chunk)
        for path, chunks in by_path.items():
            self.done[path] = coalesce([*self.done[path], *((c.offset, c.offset + c.size) for c in chunks)])
        self.state().save(self.target)
        if self.verifying:
            # Read back what is now durable while the next blocks are fetched and written.
            for path, chunks in by_path.items():
                self.checks.append((path, chunks, self.verifier.submit(self.check, path, chunks)))

    def check(self, path: str, chunks: list[ChunkRef]) -> list[ChunkRef]:
        """The chunks among ``chunks`` whose data in the target file does not have their id."""
        ids = self.repository.local_ids(self.target / path, chunks)
        return [c for c, got in zip(chunks, ids, strict=True) if got != c.id]

    def emit(self, path: str) -> None:
        # Called after a block is written and before it is recorded: a callback that raises leaves it unrecorded.
        if self.progress is not None:
            self.progress(Progress("restore", path, self.bytes_written + self.bytes_zero, self.total))

    # -- steps ------------------------------------------------------------

    def open_files(self) -> None:
        self.target.mkdir(parents=True, exist_ok=True)
        for f in self.plan.files:
            rel = f.source.target_path
            path = target_file(self.target, rel)
            parent = self.target
            for part in rel.split("/")[:-1]:
                parent = parent / part
                parent.mkdir(exist_ok=True)
                # A folder on the way (e.g. Snapshots/) must be one, not a symlink to one.
                if not stat.S_ISDIR(os.lstat(parent).st_mode):
                    raise RestoreError(f"{parent} is not a folder; a restore never writes through a symlink",
                                       path=os.path.relpath(parent, self.target))
            self.fds[rel] = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)

    def close(self) -> None:
        self.syncer.shutdown(wait=True, cancel_futures=True)
        self.verifier.shutdown(wait=True, cancel_futures=True)
        for fd in [*self.fds.values(), *self.source_fds.values()]:
            os.close(fd)
        self.fds.clear()
        self.source_fds.clear()

    def write(self, path: str, data: bytes, offset: int) -> None:
        fd = self.fds[path]
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n

    def read_source(self, source: str, offset: int, size: int) -> bytes:
        fd = self.source_fds.get(source)
        if fd is None:
            fd = self.source_fds[source] = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        return os.pread(fd, size, offset)

    def copies(self) -> list[tuple[str, BlockAction]]:
        """Run the copies in a safe order; return those whose source no longer holds the data."""
        failed: list[tuple[str, BlockAction]] = []
        for path, action in _copy_order(self.plan, self.target):
            assert action.source is not None
            try:
                data = self.read_source(action.source, action.source_offset, action.chunk.size)
            except OSError:
                data = b""
            if len(data) != action.chunk.size or self.repository.chunk_id(data) != action.chunk.id:
                failed.append((path, action))
                continue
            self.write(path, data, action.chunk.offset)
            self.bytes_copied += len(data)
            self.bytes_written += len(data)
            self.emit(path)
            self.record(path, action.chunk)
        return failed

    def zeros(self) -> None:
        for f in self.plan.files:
            path = f.source.target_path
            size = os.fstat(self.fds[path]).st_size
            for action in f.actions:
                if action.kind != "zero" or action.chunk.offset >= size:
                    continue
                end = action.chunk.offset + action.chunk.size
                self.punch(self.fds[path], action.chunk.offset, min(end, size) - action.chunk.offset)
                self.bytes_zero += action.chunk.size
                if end <= size:
                    # A block that reaches past the current end reads as zeros only once the file has its
                    # final size (at the end): recorded now, the read-back could see it short.
                    self.record(path, action.chunk)

    def fetch(self, places: dict[bytes, list[tuple[str, BlockAction]]], stream_ids: list[bytes]) -> None:
        if not stream_ids:
            return
        with self.repository.fetch(stream_ids, errors="report") as chunks:
            self.fetch_from(chunks, places)

    def fetch_from(self, chunks: Iterable[FetchedChunk], places: dict[bytes, list[tuple[str, BlockAction]]]) -> None:
        """Write the stream's chunks at every offset that needs them.

        The writes run in a thread of their own, a few chunks behind, so that
        reading the next chunk from the worker overlaps with writing this one.
        """
        queue: Queue[tuple[bytes, list[tuple[str, BlockAction]]] | None] = Queue(maxsize=_WRITES_IN_FLIGHT)
        failed: list[BaseException] = []

        def writer() -> None:
            while (item := queue.get()) is not None:
                if failed:
                    continue  # drain, so the reader never blocks on a full queue
                data, where = item
                try:
                    for path, action in where:
                        self.write(path, data, action.chunk.offset)
                        self.bytes_written += len(data)
                    self.emit(where[0][0])
                    for path, action in where:
                        self.record(path, action.chunk)
                except BaseException as exc:  # re-raised in the reading thread
                    failed.append(exc)

        thread = threading.Thread(target=writer, name="vbremote-write", daemon=True)
        thread.start()
        try:
            for chunk in chunks:
                if failed:
                    break
                where = places.get(chunk.id)
                if where is None:
                    continue  # a prefetched chunk that this plan does not fetch

                first_path, first = where[0]
                if chunk.error is not None:
                    raise IntegrityError(
                        f"{first_path} at offset {first.chunk.offset}: {chunk.error}",
                        location=chunk.error.location, chunk_id=chunk.id.hex(), path=first_path,
                        offset=first.chunk.offset,
                    ) from chunk.error
                data = chunk.data
                # borg authenticated the chunk and checked its id when it decrypted it, in the worker;
                # hashing it again here would cost a second pass over every fetched byte, so only the
                # size is checked. The read-back verification hashes what reached the disk.
                if len(data) != first.chunk.size:
                    raise IntegrityError(
                        f"{first_path} at offset {first.chunk.offset}: chunk {chunk.id.hex()} has {len(data)} "
                        f"bytes, not {first.chunk.size}",
                        chunk_id=chunk.id.hex(), path=first_path, offset=first.chunk.offset,
                    )
                self.bytes_fetched += len(data)
                self.chunks_fetched += 1
                self.arrived.add(chunk.id)
                queue.put((data, where))
        finally:
            queue.put(None)
            thread.join()
        if failed:
            raise failed[0]

    def sizes(self) -> None:
        for f in self.plan.files:
            fd = self.fds[f.source.target_path]
            if os.fstat(fd).st_size != f.source.size:
                os.ftruncate(fd, f.source.size)
            os.fsync(fd)

    def verify(self, mode: Verify) -> int:
        """Finish the read-back: wait for the checks made while writing, then check the rest the mode asks for."""
        checked: dict[str, set[int]] = {f.source.target_path: set() for f in self.plan.files}
        bad: list[tuple[str, ChunkRef]] = []
        total = 0
        for path, chunks, future in self.checks:
            bad.extend((path, c) for c in future.result())
            checked[path].update(c.offset for c in chunks)
            total += sum(c.size for c in chunks)
        for f in self.plan.files:
            path = f.source.target_path
            earlier = self.previously_done(path)
            rest = [
                c for c in f.source.chunks
                if c.offset not in checked[path]
                and (mode == "full" or _overlaps(earlier, c.offset, c.offset + c.size))
            ]
            if rest:
                bad.extend((path, c) for c in self.check(path, rest))
                total += sum(c.size for c in rest)
        if bad:
            for path, c in bad:
                self.done[path] = subtract(self.done[path], c.offset, c.offset + c.size)
            self.state().save(self.target)
            path, first = bad[0]
            raise IntegrityError(
                f"{path} at offset {first.offset}: the data read back does not match the archive's chunk "
                f"{first.id.hex()} ({len(bad)} block(s) wrong)",
                chunk_id=first.id.hex(), path=path, offset=first.offset,
            )
        return total

    def previously_done(self, path: str) -> tuple[tuple[int, int], ...]:
        """What an interrupted run of this plan recorded (written then, verified now)."""
        return self.initial_done.get(path, ())


def _overlaps(ranges: tuple[tuple[int, int], ...], start: int, end: int) -> bool:
    return any(a < end and start < b for a, b in ranges)


def _copy_order(plan: RestorePlan, target: Path) -> list[tuple[str, BlockAction]]:
    """The copies, each after the copies that read the block it overwrites (cycles in plan order)."""
    copies = [(f.source.target_path, a) for f in plan.files for a in f.actions if a.kind == "copy"]
    dest_key = [(os.fspath(target / path), a.chunk.offset) for path, a in copies]
    readers: dict[tuple[str, int], list[int]] = {}
    for i, (_path, a) in enumerate(copies):
        assert a.source is not None
        readers.setdefault((a.source, a.source_offset), []).append(i)
    indegree = [0] * len(copies)
    after: list[list[int]] = [[] for _ in copies]
    for i, key in enumerate(dest_key):
        for r in readers.get(key, ()):
            if r != i:
                indegree[i] += 1
                after[r].append(i)
    queue = deque(i for i, d in enumerate(indegree) if d == 0)
    order: list[int] = []
    placed = [False] * len(copies)
    while queue or len(order) < len(copies):
        if not queue:  # a cycle: take the first left, its readers will fall back to a fetch
            queue.append(next(i for i, p in enumerate(placed) if not p))
        i = queue.popleft()
        if placed[i]:
            continue
        placed[i] = True
        order.append(i)
        for j in after[i]:
            indegree[j] -= 1
            if indegree[j] == 0 and not placed[j]:
                queue.append(j)
    return [copies[i] for i in order]


def apply_plan(
    repository: Repository,
    plan: RestorePlan,
    *,
    verify: Verify = "written",
    progress: Callable[[Progress], None] | None = None,
    prefetch: Prefetch | None = None,
) -> ApplyStats:
    """Write the plan's files into its target folder; resumable, verified.

    Writes only ``plan.source.files`` (never the settings file) and the
    journal. Fetches the distinct chunks the plan fetches in one pipelined
    stream, copies local data, punches zero blocks as holes, records durable
    blocks in the journal, sets each file's final size, verifies and removes
    the journal. If it is interrupted (killed, a full disk, a bad chunk), make
    a new plan for the same archive and apply it: it continues.

    Args:
        repository: The repository the archive is in.
        plan: The plan from :func:`make_plan` (its problems are not checked here).
        verify: ``"written"``: read back every block this restore wrote (in
            this run or an interrupted one) and hash it against the archive's
            id; ``"full"``: every block of every file; ``"none"``: no read-back.
        progress: Called with a :class:`Progress` (operation ``"restore"``) as blocks are written.
        prefetch: The :class:`Prefetch` given to :func:`make_plan` for this plan:
            its chunks are written first, the rest fetched after.

    Returns:
        What was done.

    Raises:
        IntegrityError: A chunk failed verification (fetched, or read back);
            ``path`` and ``offset`` name the first place it belongs. Nothing
            wrong stays recorded as done.
        TargetSpaceError: The target file system is full; what is durable is
            recorded, run again once space is freed.
        RestoreError: Another failure writing the target.
        ConfigurationError: ``verify`` is unknown.
    """
    if verify not in ("written", "full", "none"):
        raise ConfigurationError(f"verify must be 'written', 'full' or 'none', not {verify!r}")
    started = time.monotonic()
    applier = _Applier(repository, plan, progress)
    applier.verifying = verify != "none"
    archive = plan.source.archive
    try:
        applier.open_files()
        applier.state().save(plan.target)
        fetches = list(distinct_fetches(plan))
        places: dict[bytes, list[tuple[str, BlockAction]]] = {}
        for f in plan.files:
            for a in f.actions:
                if a.kind == "fetch":
                    places.setdefault(a.chunk.id, []).append((f.source.target_path, a))
        prefetched = set(prefetch.ids) if prefetch is not None else set()
        if prefetched:
            # The prefetch has been sending since the plan knew its chunks; the rest follow in a stream
            # of their own once it is done (one stream at a time).
            failed = applier.copies()
            applier.zeros()
            assert prefetch is not None
            applier.fetch_from(prefetch.chunks(), places)
            applier.fetch(places, [i for i in fetches if i not in prefetched])
        elif fetches:
            # Opened before the copies, so that the repository already sends while they run.
            with repository.fetch(fetches, errors="report") as chunks:
                failed = applier.copies()
                applier.zeros()
                applier.fetch_from(chunks, places)
        else:
            failed = applier.copies()
            applier.zeros()
        if failed:
            again: dict[bytes, list[tuple[str, BlockAction]]] = {}
            for path, a in failed:
                again.setdefault(a.chunk.id, []).append((path, a))
            applier.fetch(again, list(again))
        missing = [i for i in fetches if i not in applier.arrived]
        if missing:
            # A stream that ends early without an error must not pass for a finished restore.
            _flush_quietly(applier)  # what did arrive stays recorded
            raise RestoreError(
                f"the repository sent {len(fetches) - len(missing)} of the {len(fetches)} chunks asked for; "
                f"chunk {missing[0].hex()} never came; restore again to continue", archive=archive)
        applier.flush()
        applier.sizes()
        verified = 0 if verify == "none" else applier.verify(verify)
        remove_journal(plan.target)
    except IntegrityError:
        _flush_quietly(applier)  # the good blocks written before the bad one stay recorded
        raise
    except OSError as exc:
        _flush_quietly(applier)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise TargetSpaceError(
                f"the file system of {plan.target} is full: {exc.strerror}; what was written is recorded, "
                "free space and restore again to continue",
                archive=archive, path=exc.filename,
            ) from exc
        raise RestoreError(f"writing into {plan.target} failed: {exc}", archive=archive, path=exc.filename) from exc
    finally:
        if prefetch is not None:
            prefetch.close()
        applier.close()
    return ApplyStats(
        bytes_fetched=applier.bytes_fetched,
        bytes_copied=applier.bytes_copied,
        bytes_written=applier.bytes_written,
        bytes_zero=applier.bytes_zero,
        chunks_fetched=applier.chunks_fetched,
        bytes_verified=verified,
        seconds=time.monotonic() - started,
        resumed=plan.resumed,
    )


def _flush_quietly(applier: _Applier) -> None:
    """Record what can still be made durable after a failure; keep the old journal if that fails too."""
    with contextlib.suppress(OSError):
        applier.wait_sync()  # a batch that failed is simply not recorded
    if applier.sync_failed:
        return  # nothing written after a failed fsync is trusted
    with contextlib.suppress(OSError):
        applier.flush()
