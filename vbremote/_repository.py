"""vbremote's view of a borg repository."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pickle
import re
import stat
import time
import uuid as uuid_module
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import attrs
from attrs import define, field, frozen

from ._borg import BorgWorker, ProgressCallback, WorkerStream
from ._borg._idhash import DEFAULT_READ_AHEAD, IdHasher, ReadAheadMeter, fixed_ranges, hash_ranges
from ._borg._items import contents_from_rows
from ._diskformats import disk_chunking
from ._errors import (
    ArchiveMetadataError,
    ArchiveNotFound,
    ConfigurationError,
    IntegrityError,
    PassphraseMissing,
    RepositoryError,
    RepositoryReadOnly,
    SourceChanged,
)
from ._models import (
    ArchiveContents,
    ArchiveFile,
    ArchiveInfo,
    CheckResult,
    Chunking,
    ChunkRef,
    CompactResult,
    DeleteResult,
    FileChunks,
    FileRole,
    FileSpec,
    Progress,
    SnapshotMetadata,
    WriteResult,
    decode_comment,
    encode_comment,
)
from ._transports import Transport

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_CHECKPOINT_INTERVAL",
    "DEFAULT_ENCRYPTION",
    "DEFAULT_READ_AHEAD",
    "ENCRYPTION_MODES",
    "ChunkStream",
    "FetchErrors",
    "FetchedChunk",
    "Passphrase",
    "Repository",
]

#: A passphrase, a callable that returns one (asked once, at open), or None
#: for borg's own variables (BORG_PASSPHRASE, BORG_PASSCOMMAND, BORG_PASSPHRASE_FD).
Passphrase = str | Callable[[], str] | None

#: borg 1.4's encryption modes, all supported.
ENCRYPTION_MODES = (
    "repokey",
    "repokey-blake2",
    "keyfile",
    "keyfile-blake2",
    "authenticated",
    "authenticated-blake2",
    "none",
)

#: Chosen by measurement (docs/repositories.md, ``nox -s bench``): HMAC-SHA256
#: ids run on the CPU's SHA extensions where present, and the key stays in the
#: repository, so a second host only needs the passphrase.
DEFAULT_ENCRYPTION = "repokey"

MAX_LISTED_ITEMS = 1_000_000
"""The most items :meth:`Repository.chunk_lists` accepts in one archive (a VM folder holds a few
dozen); a listing with more is refused as it is read, before it takes the memory."""

MAX_LISTED_CHUNKS = 1 << 25
"""The most chunks :meth:`Repository.chunk_lists` accepts in one archive: 32 TiB of 1 MiB disk
chunks (VirtualBox's VDI stops at 2 TiB per disk), about 4 GiB of memory for the listing."""

#: Chosen by measurement (docs/repositories.md): VDI allocates 1 MiB blocks,
#: so 1 MiB chunks send what a guest changed and no more.
DEFAULT_BLOCK_SIZE = 1 << 20

#: Seconds between checkpoint archives of a long :meth:`Repository.write_archive`
#: (borg's own ``create --checkpoint-interval`` default is 1800): a write that
#: dies loses at most this much sending; the next write of the same VM sends
#: only what the last checkpoint did not hold.
DEFAULT_CHECKPOINT_INTERVAL = 300.0

# borg's names for checkpoint archives (borg/archive.py Archive.__init__, 1.4.5).
_CHECKPOINT_NAME = re.compile(r"\.checkpoint(\.\d+)?\Z")

#: What :meth:`Repository.fetch` does when a chunk fails verification.
FetchErrors = Literal["raise", "report"]

_CompactProgress = Callable[[Progress], None]

_log = logging.getLogger("vbremote.repository")

# Archive times outside these bounds are refused as hostile: borg itself
# cannot have written them, and retention arithmetic must not overflow.
_EARLIEST = datetime(1970, 1, 2, tzinfo=UTC)
_LATEST = datetime(9000, 1, 1, tzinfo=UTC)


@attrs.frozen
class _Unreadable:
    """An archive whose vbremote metadata was refused: why, to raise again when it is asked for."""

    message: str


def _resolve_passphrase(passphrase: Passphrase) -> str | None:
    if passphrase is None or isinstance(passphrase, str):
        return passphrase
    if callable(passphrase):
        value = passphrase()
        if not isinstance(value, str):
            raise ConfigurationError("the passphrase callable must return a str")
        return value
    raise ConfigurationError("passphrase must be a str, a callable returning one, or None")


def _worker_env(base_dir: Path | None, accept_relocated: bool, accept_unencrypted: bool) -> dict[str, str]:
    env = {
        "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes" if accept_relocated else "no",
        "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes" if accept_unencrypted else "no",
    }
    if base_dir is not None:
        env["BORG_BASE_DIR"] = os.fspath(base_dir)
    return env


def _check_lock_wait(lock_wait: float) -> float:
    if lock_wait < 0:
        raise ConfigurationError("lock_wait must be >= 0 seconds")
    return float(lock_wait)


def _check_read_ahead(read_ahead: int) -> int:
    if not isinstance(read_ahead, int) or isinstance(read_ahead, bool) or read_ahead < 1:
        raise ConfigurationError("read_ahead must be a positive number of bytes")
    return read_ahead


def _range(value: tuple[int, int] | ChunkRef) -> tuple[int, int]:
    try:
        offset, size = (value.offset, value.size) if isinstance(value, ChunkRef) else value
    except (TypeError, ValueError):
        raise ConfigurationError(f"a range is (offset, size), not {value!r}") from None
    if not isinstance(offset, int) or not isinstance(size, int) or offset < 0 or size < 1:
        raise ConfigurationError(f"a range is (offset >= 0, size >= 1), not {value!r}")
    return offset, size


def _folder_size(path: str) -> int:
    total = 0
    for folder, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(FileNotFoundError):  # removed while we walk
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


@define(eq=False)
class Repository:
    """An open borg repository, as vbremote uses it.

    Open one with :meth:`open` (or create one with :meth:`init`) and use it as
    a context manager; leaving the block closes it and releases borg's lock.
    A Repository may be used from several threads; its calls run one at a
    time (another thread waits its turn). A second use from the thread that
    is in the middle of one (an open fetch stream, a progress callback)
    raises :class:`RepositoryBusy` at once.

    An exception raised by your code during a call (a progress callback, the
    loop over a fetch) cancels the call: borg rolls back, and the repository
    stays usable. An interrupt (``KeyboardInterrupt``) that lands while
    vbremote waits on borg closes the repository instead; later calls raise
    :class:`RepositoryError` ("… interrupted; open it again"). The
    repositories guide explains both in "Cancelling and interrupts".

    Attributes:
        transport: How the repository is reached.
        id: The borg repository id (hex).
        encryption: The borg encryption mode (``repokey``, ``none`` …).
        block_size: The default fixed block size for disk images.
        append_only: Whether the repository is append-only, where known.
        read_ahead: The most bytes of file data read ahead of their use, by
            hashing here and by writes in the worker.
        read_only: Opened with ``read_only=True``: every write raises
            :class:`~vbremote.RepositoryReadOnly` before anything is sent.
    """

    transport: Transport
    id: str
    encryption: str
    block_size: int
    append_only: bool | None
    _worker: BorgWorker = field(repr=False)
    _hasher: IdHasher = field(repr=False)
    read_ahead: int = DEFAULT_READ_AHEAD
    # What local hashing holds in memory, measured (tests read it).
    _local_meter: ReadAheadMeter = field(factory=ReadAheadMeter, repr=False)
    read_only: bool = field(default=False, kw_only=True)
    # Archive metadata is immutable: what was read once is kept, keyed by archive id
    # (None: another tool's archive; _Unreadable: refused, see archives()).
    _metadata: dict[str, tuple[SnapshotMetadata, tuple[ArchiveFile, ...]] | _Unreadable | None] = field(
        factory=dict, repr=False
    )
    # Archives whose refusal was logged already (once per archive and connection).
    _warned: set[str] = field(factory=set, repr=False)

    # -- opening ----------------------------------------------------------

    @classmethod
    def init(
        cls,
        transport: Transport,
        *,
        encryption: str = DEFAULT_ENCRYPTION,
        passphrase: Passphrase = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        compression: str = "lz4",
        lock_wait: float = 1.0,
        base_dir: Path | None = None,
        read_ahead: int = DEFAULT_READ_AHEAD,
    ) -> Repository:
        """Create a new repository and return it open.

        Args:
            transport: Where to create it; the folder must not exist or be empty.
            encryption: One of :data:`ENCRYPTION_MODES`.
            passphrase: The key's passphrase (see :data:`Passphrase`).
            block_size: Default fixed block size for disk images (1, 2 or 4 MiB),
                recorded in the repository.
            compression: borg compression spec used for writes (``lz4``, ``zstd,3`` …).
            lock_wait: Seconds to wait for borg's repository lock.
            base_dir: borg's base folder for keys, cache and security data
                (``BORG_BASE_DIR``) for this repository only; default: borg's own.
            read_ahead: The most bytes of file data read ahead of their use
                (see :data:`DEFAULT_READ_AHEAD`).

        Returns:
            The new repository, open with an exclusive lock.

        Raises:
            RepositoryExists: Something is already there.
            PassphraseMissing: An encrypted mode was asked for without a passphrase.
            ConnectionFailed: The transport did not reach ``borg serve``.
            ConfigurationError: An argument is invalid, or the transport's class
                cannot be imported by module path in the worker process.
        """
        if encryption not in ENCRYPTION_MODES:
            raise ConfigurationError(f"encryption must be one of {', '.join(ENCRYPTION_MODES)}")
        Chunking.fixed(block_size)
        secret = _resolve_passphrase(passphrase)
        if secret is None and encryption != "none" and not _env_has_passphrase():
            raise PassphraseMissing(
                f"encryption {encryption!r} needs a passphrase: pass passphrase= or set BORG_NEW_PASSPHRASE",
                location=transport.location,
            )
        return cls._start(
            transport,
            "init",
            dict(
                encryption=encryption,
                passphrase=secret,
                lock_wait=_check_lock_wait(lock_wait),
                block_size=block_size,
                compression=compression,
            ),
            _worker_env(base_dir, accept_relocated=False, accept_unencrypted=True),
            _check_read_ahead(read_ahead),
        )

    @classmethod
    def open(
        cls,
        transport: Transport,
        *,
        passphrase: Passphrase = None,
        lock_wait: float = 1.0,
        read_only: bool = False,
        compression: str = "lz4",
        base_dir: Path | None = None,
        accept_relocated: bool = False,
        accept_unencrypted: bool = False,
        read_ahead: int = DEFAULT_READ_AHEAD,
    ) -> Repository:
        """Open an existing repository.

        Args:
            transport: How to reach it.
            passphrase: The key's passphrase (see :data:`Passphrase`).
            lock_wait: Seconds to wait for borg's repository lock.
            read_only: Take borg's shared lock (reads only) instead of the exclusive
                one; every write then raises :class:`~vbremote.RepositoryReadOnly`
                before anything is sent.
            compression: borg compression spec used for writes.
            base_dir: borg's base folder (``BORG_BASE_DIR``) for this repository only.
            accept_relocated: Accept a repository whose location changed since
                this user last used it (borg otherwise asks; vbremote refuses).
            accept_unencrypted: Accept an unencrypted repository this user has
                not used before (borg otherwise asks; vbremote refuses).
            read_ahead: The most bytes of file data read ahead of their use, by
                hashing in this process and by writes in the worker, whatever
                the number of CPUs (see :data:`DEFAULT_READ_AHEAD`).

        Returns:
            The open repository; use it as a context manager.

        Raises:
            RepositoryNotFound: No repository there.
            PassphraseMissing: The key needs a passphrase and none was found.
            PassphraseWrong: The passphrase does not unlock the key.
            RepositoryLocked: Still locked after ``lock_wait`` seconds.
            ConnectionFailed: The transport did not reach ``borg serve``.
            AccessDenied: The server refused the path, or borg refused a relocated
                or unknown unencrypted repository.
            ConfigurationError: The transport's class cannot be imported by
                module path in the worker process (see :class:`~vbremote.Transport`).
        """
        return cls._start(
            transport,
            "open",
            dict(
                passphrase=_resolve_passphrase(passphrase),
                lock_wait=_check_lock_wait(lock_wait),
                exclusive=not read_only,
                compression=compression,
            ),
            _worker_env(base_dir, accept_relocated, accept_unencrypted),
            _check_read_ahead(read_ahead),
            read_only=read_only,
        )

    @classmethod
    def _start(
        cls,
        transport: Transport,
        op: str,
        kwargs: dict[str, Any],
        env: dict[str, str],
        read_ahead: int,
        *,
        read_only: bool = False,
    ) -> Repository:
        if not isinstance(transport, Transport):
            raise ConfigurationError(f"transport must be a vbremote.Transport, not {type(transport).__name__}")
        _check_importable(transport)
        try:
            # Pickled here, unpickled by the worker's open: a class it cannot import is a clear refusal there.
            pickled = pickle.dumps(transport)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise ConfigurationError(f"transports must be picklable: {exc}") from exc
        try:
            serve_command: Sequence[str] | None = transport.serve_command()
        except Exception:  # the worker calls it again and reports what is wrong
            serve_command = None
        worker = BorgWorker(transport.location, env, serve_command)
        try:
            info = worker.call(op, transport=pickled, **kwargs)
        except BaseException:
            worker.abandon()
            raise
        try:
            hasher = _id_hasher(worker, transport.location)
            worker.call("set_read_ahead", limit=read_ahead)
        except BaseException:
            worker.close()
            raise
        return cls(
            transport=transport,
            id=info["id"],
            encryption=info["encryption"],
            block_size=info["block_size"] or DEFAULT_BLOCK_SIZE,
            append_only=info["append_only"],
            worker=worker,
            hasher=hasher,
            read_ahead=read_ahead,
            read_only=read_only,
        )

    def _refuse_if_read_only(self, operation: str) -> None:
        if self.read_only:
            raise RepositoryReadOnly(
                f"{operation}: the repository was opened with read_only=True", location=self.transport.location
            )

    def close(self) -> None:
        """Close the connection and release the lock (idempotent)."""
        self._worker.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- archives ---------------------------------------------------------

    def archives(self, vm: str | None = None) -> list[ArchiveInfo]:
        """The archives written by vbremote, oldest first.

        Archives made by other tools are skipped. Metadata is read once per
        archive and kept: a second listing costs one manifest read.

        Every record is checked as untrusted input (see "Untrusted archives"
        in the docs). An archive whose vbremote record is malformed or hostile
        is left out of the listing, with a warning on the ``vbremote.repository``
        logger; :meth:`archive` raises :class:`~vbremote.ArchiveMetadataError`
        for it. Nothing in vbremote deletes an archive it cannot read.

        Args:
            vm: Only this VM's archives: a uuid, or a name. A name selects the
                uuid(s) of the archives that carry it, then all their archives,
                so a renamed VM keeps its history and ``dev`` never selects ``dev2``.

        Raises:
            ConfigurationError: The name belongs to more than one VM (give the uuid).
        """
        rows = []
        for (name, archive_id, when), decoded in self._listing():
            if isinstance(decoded, _Unreadable):
                if archive_id not in self._warned:
                    self._warned.add(archive_id)
                    _log.warning("skipping archive %r of %s: %s", name, self.transport.location, decoded.message)
            else:
                rows.append(((name, archive_id, when), decoded))
        if vm is not None:
            selected = _select_vm([(meta.vm_name, meta.vm_uuid) for _, (meta, _) in rows], vm)
            rows = [row for row in rows if row[1][0].vm_uuid in selected]
        return [
            ArchiveInfo(name=name, id=archive_id, time=when, metadata=meta, files=files)
            for (name, archive_id, when), (meta, files) in rows
        ]

    def _listing(
        self, *, checkpoints: bool = False
    ) -> list[tuple[tuple[str, str, datetime], tuple[SnapshotMetadata, tuple[ArchiveFile, ...]] | _Unreadable]]:
        """Every archive that claims to be vbremote's, oldest first, decoded or refused.

        Checkpoint archives are never listed, unless ``checkpoints``: then only they are.
        """
        listing = self._worker.call("archives", checkpoints=checkpoints)
        missing = frozenset(archive_id for _, archive_id, _, comment in listing
                            if comment is None and archive_id not in self._metadata)
        if missing:  # the worker thinks we have them; ask again rather than skip them
            listing = self._worker.call("archives", resend=missing, checkpoints=checkpoints)
        rows: list[
            tuple[tuple[str, str, datetime], tuple[SnapshotMetadata, tuple[ArchiveFile, ...]] | _Unreadable]
        ] = []
        for name, archive_id, when, comment in listing:
            if comment is not None:
                self._metadata[archive_id] = self._decode(name, when, comment)
            decoded = self._metadata.get(archive_id)
            if isinstance(decoded, _Unreadable):
                rows.append(((name, archive_id, when), decoded))
            elif decoded is not None:
                rows.append(((name, archive_id, when.astimezone(UTC)), decoded))
        return rows

    def _decode(
        self, name: str, when: datetime, comment: str
    ) -> tuple[SnapshotMetadata, tuple[ArchiveFile, ...]] | _Unreadable | None:
        location = self.transport.location
        try:
            decoded = decode_comment(comment, archive=name, location=location)
            if decoded is not None and (
                not isinstance(when, datetime) or when.tzinfo is None or not _EARLIEST <= when <= _LATEST
            ):
                raise ArchiveMetadataError(
                    f"archive {name!r} has an implausible time {when!r}", archive=name, location=location
                )
        except ArchiveMetadataError as exc:
            return _Unreadable(str(exc))
        return decoded

    def archive(self, name: str) -> ArchiveInfo:
        """The vbremote archive named ``name``.

        Raises:
            ArchiveNotFound: There is none (or it was not written by vbremote).
            ArchiveMetadataError: It claims to be vbremote's, but its metadata
                is malformed or hostile.
        """
        for (listed_name, archive_id, when), decoded in self._listing():
            if listed_name != name:
                continue
            if isinstance(decoded, _Unreadable):
                raise ArchiveMetadataError(decoded.message, location=self.transport.location, archive=name)
            metadata, files = decoded
            return ArchiveInfo(name=name, id=archive_id, time=when, metadata=metadata, files=files)
        raise ArchiveNotFound(f"no vbremote archive named {name!r}", location=self.transport.location, archive=name)

    def write_archive(
        self,
        name: str,
        files: Sequence[FileSpec],
        metadata: SnapshotMetadata,
        *,
        timestamp: datetime | None = None,
        block_size: int | None = None,
        progress: Callable[[Progress], None] | None = None,
        checkpoint_interval: float | None = DEFAULT_CHECKPOINT_INTERVAL,
    ) -> WriteResult:
        """Store files in a new archive.

        Disk images are cut in fixed blocks (all-zero blocks are neither hashed
        nor compressed); saved states in smaller content-defined chunks
        (:meth:`Chunking.saved_state`); other files use borg's default chunker.
        Reading, hashing and compressing disk blocks run in parallel threads,
        ahead of encryption and storing (each in a thread of its own). The
        archive is an ordinary borg archive that ``borg`` itself lists, checks
        and extracts.

        Args:
            name: The archive name (must be new).
            files: The files, with archive-relative paths and roles; each
                file's new chunks are compressed with its
                :attr:`FileSpec.compression`, or the repository's compression.
            metadata: vbremote's record of the snapshot, stored with the archive.
            timestamp: The archive time (default: now), like ``borg create --timestamp``.
            block_size: Fixed block size for disks (default: the repository's).
            progress: Called with a :class:`Progress` as bytes are read: at
                each file's first chunk and at its end, and in between at
                most every 0.1 seconds. To cancel, raise from it: the write is rolled back, nothing is
                committed, your exception is re-raised, and the repository
                stays open and usable. No callback runs once the archive is
                being committed.
            checkpoint_interval: Seconds between checkpoint archives, or
                ``None`` for none. A checkpoint archive (``<name>.checkpoint``,
                as ``borg create --checkpoint-interval`` makes them) commits
                what was sent so far; if the write dies (killed, connection
                lost, an error) the checkpoint stays, and the next write of
                the same VM finds its chunks in the repository and sends only
                the rest. Checkpoints are never listed by :meth:`archives`
                (nor by ``borg list``), so neither pruning nor restoring ever
                sees them. The write's own checkpoints, and those left by
                earlier writes of the same VM (same ``metadata.vm_uuid``), are
                deleted in the commit of the archive. A write cancelled from
                ``progress`` leaves its checkpoint too, like a Ctrl-C of
                ``borg create``: no archive, but its chunks for the next write.
                Each checkpoint emits a ``"checkpoint"`` :class:`Progress`.

        Returns:
            What was written and what it cost.

        Raises:
            ArchiveExists: The name is taken.
            ConfigurationError: No files, a duplicate path, a missing file, a bad block size,
                a compression spec borg does not know (nothing is written then).
            SourceChanged: A file changed size while it was read; nothing was
                committed, and the repository stays usable.
            RepositoryReadOnly: The repository was opened with ``read_only=True``.
            RepositoryBusy: Called from a progress callback or loop of this same repository.
        """
        self._refuse_if_read_only("write_archive")
        if not name or "/" in name or name != name.strip():
            raise ConfigurationError(f"invalid archive name {name!r}")
        if _CHECKPOINT_NAME.search(name):
            raise ConfigurationError(f"invalid archive name {name!r}: borg takes names ending so for checkpoints")
        if checkpoint_interval is not None and not (
            isinstance(checkpoint_interval, int | float) and 0 < checkpoint_interval < float("inf")
        ):
            raise ConfigurationError(f"checkpoint_interval must be a positive number of seconds or None,"
                                     f" not {checkpoint_interval!r}")
        if not files:
            raise ConfigurationError("an archive needs at least one file")
        seen: set[str] = set()
        disk_block = Chunking.fixed(block_size if block_size is not None else self.block_size).params[0]
        records: list[ArchiveFile] = []
        specs: list[dict[str, Any]] = []
        for spec in files:
            if spec.path in seen:
                raise ConfigurationError(f"two files for archive path {spec.path!r}")
            seen.add(spec.path)
            try:
                size = spec.source.stat().st_size
            except OSError as exc:
                raise ConfigurationError(f"cannot read {spec.source}: {exc.strerror}") from exc
            if not spec.source.is_file():
                raise ConfigurationError(f"{spec.source} is not a regular file")
            if spec.role is FileRole.DISK:
                chunking = disk_chunking(spec.source, disk_block)
            elif spec.role is FileRole.STATE:
                chunking = Chunking.saved_state()
            else:
                chunking = Chunking.buzhash()
            records.append(ArchiveFile(path=spec.path, role=spec.role, size=size, chunking=chunking,
                                       medium=spec.medium, parent=spec.parent))
            specs.append(
                {"source": os.fspath(spec.source), "path": spec.path, "size": size, "chunking": chunking.to_json(),
                 "compression": spec.compression}
            )
        comment = encode_comment(metadata, records)
        started = time.monotonic()
        supersede = tuple(
            checkpoint
            for (checkpoint, _, _), decoded in self._listing(checkpoints=True)
            if not isinstance(decoded, _Unreadable) and decoded[0].vm_uuid == metadata.vm_uuid
        )
        result = self._worker.call(
            "write",
            progress=_progress_adapter(progress),
            name=name,
            files=specs,
            comment=comment,
            timestamp=timestamp,
            checkpoint_interval=checkpoint_interval,
            supersede=supersede,
        )
        # The worker stored each file at exactly the size recorded above, or refused.
        self._metadata[result["id"]] = (metadata, tuple(records))
        info = ArchiveInfo(name=name, id=result["id"], time=result["time"], metadata=metadata, files=tuple(records))
        return WriteResult(
            archive=info,
            bytes_read=result["read"],
            bytes_new=result["new"],
            bytes_stored=result["stored"],
            chunks=result["chunks"],
            chunks_new=result["chunks_new"],
            chunks_zero=result["zero"],
            seconds=time.monotonic() - started,
            checkpoints=result["checkpoints"],
            checkpoints_removed=tuple(result["superseded"]),
        )

    def set_labels(self, archive: str | ArchiveInfo, labels: Iterable[str]) -> ArchiveInfo:
        """Replace an archive's labels (e.g. add ``"protected"``); the data is untouched.

        The metadata is rewritten as borg rewrites an archive's comment, so the
        archive gets a new id.

        Raises:
            ArchiveNotFound: No such vbremote archive.
            ArchiveMetadataError: Its metadata is malformed or hostile.
            ConfigurationError: A label is invalid.
            RepositoryReadOnly: The repository was opened with ``read_only=True``.
        """
        self._refuse_if_read_only("set_labels")
        name = archive.name if isinstance(archive, ArchiveInfo) else archive
        current = self.archive(name)
        metadata = attrs.evolve(current.metadata, labels=frozenset(labels))
        comment = encode_comment(metadata, list(current.files))
        new_id = self._worker.call("set_comment", name=name, comment=comment)
        self._metadata[new_id] = (metadata, current.files)
        return attrs.evolve(current, id=new_id, metadata=metadata)

    def chunk_list(self, archive: str | ArchiveInfo, path: str) -> FileChunks:
        """The chunk list of one stored file, with offsets.

        Raises:
            ArchiveNotFound: No such archive.
            FileNotInArchive: The archive has no file at ``path``.
        """
        name = archive.name if isinstance(archive, ArchiveInfo) else archive
        size, chunks = self._worker.call("chunk_list", archive=name, path=path)
        refs = []
        offset = 0
        for chunk_id, chunk_size in chunks:
            refs.append(ChunkRef(id=chunk_id, offset=offset, size=chunk_size))
            offset += chunk_size
        return FileChunks(archive=name, path=path, size=size, chunks=tuple(refs))

    def chunk_lists(self, archive: str | ArchiveInfo) -> ArchiveContents:
        """Every item of an archive with the chunk lists of its regular files, read in one pass.

        Works on any borg archive, including those the borg CLI made. What the
        archive says is validated before it is returned: an archive is input
        from a server that may be compromised.

        Args:
            archive: The archive (its name, or its :class:`ArchiveInfo`).

        Returns:
            Every item in archive order, with its kind; regular files with
            their chunks and offsets (:meth:`ArchiveContents.files`).

        Raises:
            ArchiveNotFound: No such archive.
            ArchiveInvalid: A path that is absolute, not normalised or leaves the
                folder, a duplicate path, an unknown item type, sizes that do
                not add up, or more than :data:`MAX_LISTED_ITEMS` items or
                :data:`MAX_LISTED_CHUNKS` chunks; the error names the archive
                and the item.
        """
        name = archive.name if isinstance(archive, ArchiveInfo) else archive
        try:
            rows = self._worker.call("chunk_lists", archive=name, max_items=MAX_LISTED_ITEMS,
                                     max_chunks=MAX_LISTED_CHUNKS)
        except ArchiveNotFound as exc:
            raise ArchiveNotFound(str(exc), location=self.transport.location, archive=name) from exc
        return contents_from_rows(name, rows, location=self.transport.location)

    def chunk_id(self, data: bytes | memoryview) -> bytes:
        """The id this repository's key gives ``data`` (borg's id hash), computed in this process.

        Args:
            data: A chunk's plaintext.

        Returns:
            The 32-byte id.
        """
        return self._hasher(data)

    def zero_chunk_id(self, size: int) -> bytes:
        """The id of an all-zero chunk of ``size`` bytes, so that zero blocks need not be fetched.

        Args:
            size: The chunk size in bytes (>= 1).

        Returns:
            The 32-byte id (computed once per size, then remembered).

        Raises:
            ConfigurationError: ``size`` is not a positive number of bytes.
        """
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ConfigurationError(f"a chunk size is a positive number of bytes, not {size!r}")
        return self._hasher.zero_id(size)

    def local_ids(
        self,
        source: str | os.PathLike[str],
        ranges: Iterable[tuple[int, int] | ChunkRef],
        *,
        progress: Callable[[Progress], None] | None = None,
    ) -> list[bytes | None]:
        """The ids of a local file's data at arbitrary ``(offset, size)`` ranges.

        Give the archive's own chunk boundaries (a :class:`FileChunks`'
        chunks work as ranges) to compare a local file with a stored one,
        whatever chunker cut it. Ranges are hashed in parallel threads of this
        process, with the key's id function: this never waits for the
        repository's calls to borg, so it runs while a fetch from the same
        repository is under way, even from inside its loop. At most
        :attr:`read_ahead` bytes are in memory (at least one range, read in
        pieces of at most 8 MiB).

        Args:
            source: The local file.
            ranges: ``(offset, size)`` pairs or :class:`ChunkRef` values;
                they may overlap and come in any order.
            progress: Called with a :class:`Progress` (operation ``"hash"``)
                as ranges are hashed.

        Returns:
            One id per range, in the order given; ``None`` for a range that
            reaches past the end of the file (wholly or partly).

        Raises:
            ConfigurationError: The file cannot be read, or a range has a
                negative offset or a size below 1.
        """
        checked = [_range(r) for r in ranges]
        path = Path(source)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise ConfigurationError(f"cannot read {path}: {exc.strerror}") from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigurationError(f"{path} is not a regular file")
            total = sum(size for _, size in checked)
            report = None
            if progress is not None:
                callback = progress

                def report(done: int) -> None:
                    callback(Progress(operation="hash", path=str(path), done=done, total=total))

            return hash_ranges(
                self._hasher, fd, checked, read_ahead=self.read_ahead, meter=self._local_meter, progress=report
            )
        except OSError as exc:
            raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}") from exc
        finally:
            os.close(fd)

    def local_chunk_ids(
        self,
        source: str | os.PathLike[str],
        *,
        chunking: Chunking | None = None,
        progress: Callable[[Progress], None] | None = None,
    ) -> list[bytes]:
        """The ids of a local file's fixed blocks, exactly as this repository's key computes them.

        Hashing runs in parallel threads of this process (see :meth:`local_ids`).
        Give the chunking of the stored file to compare with
        (``ArchiveInfo.file(path).chunking``); by default the file is cut as
        :meth:`write_archive` would cut it now.

        Raises:
            ConfigurationError: The file cannot be read, or the chunking is not a fixed one.
            SourceChanged: The file shrank while it was read.
        """
        path = Path(source)
        if not path.is_file():
            raise ConfigurationError(f"{path} is not a readable regular file")
        if chunking is None:
            chunking = disk_chunking(path, self.block_size)
        if chunking.kind != "fixed":
            raise ConfigurationError("local chunk ids are computed for fixed chunkings only")
        ranges = fixed_ranges(path.stat().st_size, chunking.params[0], chunking.header_size)
        ids = self.local_ids(path, ranges, progress=progress)
        result = [chunk_id for chunk_id in ids if chunk_id is not None]
        if len(result) != len(ids):
            raise SourceChanged(f"{path}: file shrank while it was read", location=self.transport.location)
        return result

    def fetch(self, ids: Iterable[bytes], *, errors: FetchErrors = "raise") -> ChunkStream:
        """Fetch chunks by id as one pipelined stream; use it as a context manager.

        ::

            with repo.fetch(ids) as chunks:
                for chunk in chunks:
                    target.write_at(offsets[chunk.id], chunk.data)

        The whole list goes to the worker in one request, and the worker asks
        borg for all of it in one pipelined ``get_many``, so a remote
        repository always has requests in flight (borg keeps up to 100
        outstanding) and never waits for a batch to drain. Each distinct id is
        fetched once, in the order of its first appearance, however often
        ``ids`` lists it; map ids to offsets yourself. Every chunk is
        authenticated and checked against its id.

        Memory stays bounded: chunks are read from the worker only as you
        iterate, and the worker blocks when the pipe is full, so at most one
        chunk waits in this process and about 100 (borg's requests in flight)
        in the worker. Leaving the ``with`` block early (a ``break``, an
        exception) cancels the rest in the worker and leaves the repository
        in step and usable. The repository is busy for this thread while the
        stream is open (:class:`RepositoryBusy`); other threads wait.

        Args:
            ids: Chunk ids (32 bytes each), e.g. from :meth:`chunk_list`.
            errors: ``"raise"``: a chunk that is missing or fails verification
                raises :class:`IntegrityError` (naming it in ``chunk_id``) and ends
                the stream. ``"report"``: that chunk comes back with ``error`` set
                and empty ``data``, and the stream goes on with the rest.

        Returns:
            A :class:`ChunkStream` of :class:`FetchedChunk`.

        Raises:
            ConfigurationError: An id is not 32 bytes, or ``errors`` is unknown.
            IntegrityError: While iterating, with ``errors="raise"``.
        """
        if errors not in ("raise", "report"):
            raise ConfigurationError(f"errors must be 'raise' or 'report', not {errors!r}")
        return ChunkStream(self._worker, _distinct_ids(ids), errors=errors)

    def fetch_chunks(self, ids: Iterable[bytes]) -> Iterator[tuple[bytes, bytes]]:
        """Fetch chunks by id, in the order given, each verified against its id.

        A thin wrapper of :meth:`fetch` that yields a pair for every id given,
        repeats included (a repeated id is fetched again). The repository is
        busy until the iteration ends: exhaust the iterator, leave the loop, or
        close it (``contextlib.closing``) before other calls; prefer
        :meth:`fetch` with ``with``.

        Yields:
            ``(id, plaintext)`` pairs.

        Raises:
            IntegrityError: A chunk is missing or failed verification (its id is on the error).
        """
        wanted = [_chunk_id(chunk_id) for chunk_id in ids]
        with ChunkStream(self._worker, wanted, errors="raise") as chunks:
            for chunk in chunks:
                yield chunk.id, chunk.data

    def delete_archives(self, archives: Iterable[str | ArchiveInfo]) -> DeleteResult:
        """Delete archives (all or none); run :meth:`compact` to free the space.

        Raises:
            ArchiveNotFound: One of them does not exist; nothing was deleted.
            RepositoryReadOnly: The repository was opened with ``read_only=True``.
        """
        self._refuse_if_read_only("delete_archives")
        names = [a.name if isinstance(a, ArchiveInfo) else a for a in archives]
        if not names:
            return DeleteResult(deleted=(), append_only=self.append_only)
        deleted = self._worker.call("delete", names=names)
        return DeleteResult(deleted=tuple(deleted), append_only=self.append_only)

    def compact(self) -> CompactResult:
        """Free the space of deleted data (borg ``compact``).

        An append-only repository is never compacted: its server keeps every
        segment so that deletes can be rolled back there.

        Raises:
            RepositoryReadOnly: The repository was opened with ``read_only=True``.
        """
        self._refuse_if_read_only("compact")
        local = self.transport.serve_command() is None
        before = _folder_size(self.transport.path) if local else None
        self._worker.call("compact")
        freed = None if before is None else max(0, before - _folder_size(self.transport.path))
        return CompactResult(freed_bytes=freed, append_only=self.append_only)

    def check(self, *, verify_data: bool = False) -> CheckResult:
        """Check the repository and its archives (``borg check``; with ``verify_data``, every chunk)."""
        ok, problems = self._worker.call("check", verify_data=verify_data)
        return CheckResult(ok=ok, problems=tuple(problems))


def _id_hasher(worker: BorgWorker, location: str) -> IdHasher:
    described = worker.call("id_key")
    try:
        return IdHasher.from_worker(described["algorithm"], described["key"], described["probe_id"])
    except ValueError as exc:
        raise RepositoryError(f"cannot compute this repository's chunk ids: {exc}", location=location) from exc


@frozen
class FetchedChunk:
    """One chunk from :meth:`Repository.fetch`.

    Attributes:
        id: The chunk id.
        data: The plaintext, verified against ``id``; empty when ``error`` is set.
        error: With ``errors="report"``, why this chunk could not be fetched
            (its ``chunk_id`` is this id's hex); otherwise always None.
    """

    id: bytes
    data: bytes
    error: IntegrityError | None = None


class ChunkStream:
    """The chunks of one :meth:`Repository.fetch`, in the order asked; a context manager.

    Iterate it inside ``with``; leaving the block closes it, which cancels
    whatever the worker has not sent yet.

    Attributes:
        ids: The ids that will come, in order: for :meth:`Repository.fetch`,
            each distinct id asked for once, in the order of first appearance.
    """

    def __init__(self, worker: BorgWorker, ids: list[bytes], *, errors: FetchErrors) -> None:
        self.ids: tuple[bytes, ...] = tuple(ids)
        self._worker = worker
        self._errors = errors
        self._stream: WorkerStream | None = None
        self._closed = False

    def __enter__(self) -> ChunkStream:
        self._start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _start(self) -> None:
        if self._stream is None and not self._closed and self.ids:
            self._stream = self._worker.stream("fetch", ids=list(self.ids), errors=self._errors)

    def __iter__(self) -> Iterator[FetchedChunk]:
        self._start()
        stream = self._stream
        if stream is None:
            return
        location = self._worker.location
        for chunk_id, data, message in stream:
            if message is None:
                yield FetchedChunk(id=chunk_id, data=data)
            else:
                error = IntegrityError(message, location=location, chunk_id=chunk_id.hex())
                yield FetchedChunk(id=chunk_id, data=b"", error=error)

    def close(self) -> None:
        """Stop the stream (idempotent): the rest is cancelled in the worker."""
        self._closed = True
        if self._stream is not None:
            self._stream.close()


def _chunk_id(value: bytes) -> bytes:
    chunk_id = bytes(value)
    if len(chunk_id) != 32:
        raise ConfigurationError(f"a chunk id is 32 bytes, not {len(chunk_id)}: {chunk_id.hex()!r}")
    return chunk_id


def _distinct_ids(ids: Iterable[bytes]) -> list[bytes]:
    """The ids, each once, in the order of first appearance."""
    return list(dict.fromkeys(_chunk_id(chunk_id) for chunk_id in ids))


def _check_importable(transport: Transport) -> None:
    """Refuse, before a worker starts, a transport class the worker cannot import by name.

    The worker process receives the transport pickled, that is by module path
    and qualified name; a class defined in ``__main__`` or inside a function
    cannot be found there. (The worker checks again what it can import: a
    module on this process's ``sys.path`` only, such as a test folder, is not
    on the worker's.)
    """
    cls = type(transport)
    module, qualname = cls.__module__, cls.__qualname__
    problem = None
    if module == "__main__":
        problem = "it is defined in __main__"
    elif "<locals>" in qualname:
        problem = "it is defined inside a function"
    else:
        try:
            found: Any = importlib.import_module(module)
            for part in qualname.split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError):
            found = None
        if found is not cls:
            problem = f"{module}.{qualname} does not name it"
    if problem is not None:
        raise ConfigurationError(
            f"transport class {qualname} cannot be used: {problem}. Transports are handed to the borg worker"
            " process by module path, so define the class at the top level of an importable module"
        )


def _env_has_passphrase() -> bool:
    return any(
        name in os.environ
        for name in ("BORG_NEW_PASSPHRASE", "BORG_PASSPHRASE", "BORG_PASSCOMMAND", "BORG_PASSPHRASE_FD")
    )


def _progress_adapter(callback: Callable[[Progress], None] | None) -> ProgressCallback | None:
    if callback is None:
        return None

    def adapter(operation: str, path: str, done: int, total: int) -> None:
        callback(Progress(operation=operation, path=path, done=done, total=total))

    return adapter


def _select_vm(vms: Sequence[tuple[str, str]], vm: str) -> set[str]:
    """The uuids that ``vm`` (a uuid, or a name) selects among (name, uuid) pairs."""
    try:
        as_uuid = str(uuid_module.UUID(vm))
    except ValueError:
        as_uuid = None
    if as_uuid is not None:
        return {as_uuid, vm}
    uuids = {uuid for name, uuid in vms if name == vm}
    if len(uuids) > 1:
        raise ConfigurationError(
            f"the name {vm!r} belongs to more than one VM ({', '.join(sorted(uuids))}): give the uuid"
        )
    return uuids

