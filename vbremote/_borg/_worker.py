"""The borg worker: a child process that owns one borg repository connection.

This module is the only code in vbremote that imports ``borg``. It runs as
``python -m vbremote._borg._worker`` so that borg's process-wide habits
(logging setup, passphrase prompts, environment variables, per-process
repository locks, umask) stay in a process of their own. It reads requests
from the pipe on its stdin and answers on the pipe on its stdout (see
``_protocol``): a reader thread takes every message as it arrives, so a
cancel reaches a running operation, which checks for it between blocks and
rolls back.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import hmac
import json
import logging
import os
import queue
import re
import stat
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from typing import Any

import lz4.block

from .._transports import _borg_url_path
from . import _protocol
from ._idhash import DEFAULT_READ_AHEAD, PROBE, Budget, ReadAheadMeter

# --- borg is imported below, after stdout has been moved out of the way ---

ZERO = bytes(4 << 20)

# A fetch decrypts ahead of what it has sent by at most this many payload bytes and chunks.
_FETCH_AHEAD_BYTES = 16 << 20
_FETCH_AHEAD_CHUNKS = 8
# The kernel is asked to read the segment entries of a local fetch this far ahead (see _SegmentReadAhead).
_READ_AHEAD_BYTES = 64 << 20
_READ_AHEAD_CHUNKS = 64

# vbremote's default disk block size, kept in the manifest's config (borg keeps
# unknown keys there when it rewrites the manifest). Keys there are bytes.
_BLOCK_SIZE_KEY = b"vbremote_block_size"

# The names borg gives checkpoint archives: ``<name>.checkpoint`` and
# ``<name>.checkpoint.N`` (borg/archive.py Archive.__init__; the same pattern
# borg prune uses to tell them apart, borg/archiver.py do_prune, 1.4.5).
_CHECKPOINT = re.compile(r"\.checkpoint(\.\d+)?\Z")

# The archive-metadata cache file (see Worker._comment_cache).
_COMMENT_CACHE_FORMAT = 2
_COMMENT_CACHE_LABEL = b"vbremote archive comment cache v2"


class _Refused(Exception):
    """A refusal of the worker's own (or a prompt it will not show), with the kind of error it maps to."""

    def __init__(self, kind: str, message: str, *, chunk_id: str | None = None, **context: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.chunk_id = chunk_id
        # What the error is about (archive, path), for the attributes of the parent's error.
        self.context = context


class _ForwardingHandler(logging.Handler):
    """Sends log records to the parent and remembers the remote's recent words."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(logging.INFO)
        self.worker = worker
        self.remote_lines: collections.deque[str] = collections.deque(maxlen=20)
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a malformed borg log call must not kill the worker
            message = str(record.msg)
        if message.startswith("Remote: "):
            self.remote_lines.append(message[len("Remote: ") :].strip())
        if record.levelno >= logging.ERROR:
            self.errors.append(message)
        self.worker.log(record.levelno, record.name, message)


class _StderrTap:
    """borg writes a remote's plain stderr lines (ssh's errors) to sys.stderr; log them."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        if text.startswith("Remote: "):
            logging.getLogger("borg.remote").warning("%s", text.rstrip())
            return len(text)
        return int(self.stream.write(text))

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class Worker:
    def __init__(self, requests: Connection, replies: Connection) -> None:
        self.requests = requests
        self.replies = replies
        # Filled by the reader thread; None once the parent is gone.
        self.inbox: queue.SimpleQueue[_protocol.Request | None] = queue.SimpleQueue()
        self.decisions: queue.SimpleQueue[_protocol.Decision | None] = queue.SimpleQueue()
        # The request being run (set by the reader as it queues one: requests
        # come one at a time), and whether the parent cancelled it.
        self.current: int | None = None
        self.cancelled = threading.Event()
        self.state_lock = threading.Lock()
        # Log records from outside a request wait for the next one, so every frame carries a request id.
        self.idle_logs: collections.deque[tuple[int, str, str]] = collections.deque(maxlen=100)
        self.repository: Any = None
        self.key: Any = None
        self.manifest: Any = None
        self.location = ""
        self.append_only: bool | None = None
        # Ids of the archives whose comment the parent has (it caches them).
        self.sent: set[bytes] = set()
        # The manifest's archives, sorted by time; dropped whenever the manifest may change.
        self.listing: list[Any] | None = None
        self.send_lock = threading.Lock()
        # The request whose replies are being sent (None while idle).
        self.running: int | None = None
        self.handler = _ForwardingHandler(self)
        # Reading, hashing and compressing file blocks (see _blocks).
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2))
        # One thread each: the cipher takes its nonces in order, and the
        # repository is one connection that stores in order.
        self.encrypt_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.put_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        # Held by whichever thread talks to the repository while a write's
        # threads run: the put thread, or the encrypt thread when borg's nonce
        # manager asks the repository for a new reservation (see _guard_key).
        self.repository_lock = threading.Lock()
        # The compression of file data (see _Compression), by spec.
        self.compression = ""
        self.compressions: dict[str, _Compression] = {}
        # borg's decompressors write into the module-wide buffer its compressors
        # use too: one of either at a time.
        self.decompress_lock = _BORG_COMPRESSION
        # Bytes of file data read ahead of their use, at most (see _blocks).
        self.read_ahead = DEFAULT_READ_AHEAD
        self.read_ahead_meter = ReadAheadMeter()
        self.get_many_calls = 0

    # -- messages ---------------------------------------------------------

    def reply(self, kind: str, payload: Any) -> None:
        """Send one reply to the request being run."""
        # Log records may come from any thread; frames must not interleave.
        with self.send_lock:
            assert self.running is not None, "a reply outside a request"
            self.replies.send(_protocol.Reply(self.running, kind, payload))

    def item(self, value: Any) -> None:
        """Send one element of a streamed result, unless the parent cancelled the request."""
        self.check_cancelled()
        self.reply(_protocol.ITEM, value)

    def item_data(self, value: tuple[Any, ...], position: int) -> None:
        """Send an element of a streamed result whose element at ``position`` is bytes, sent raw.

        A ``data`` reply names the size; the bytes follow it on the pipe as they
        are, so a fetched chunk is neither pickled here nor unpickled there.
        """
        self.check_cancelled()
        data = memoryview(value[position]).cast("B")
        head = (*value[:position], None, *value[position + 1 :])
        with self.send_lock:
            assert self.running is not None, "a reply outside a request"
            self.replies.send(_protocol.Reply(self.running, _protocol.DATA, (head, position, len(data))))
            fd = self.replies.fileno()
            while data:
                data = data[os.write(fd, data) :]

    def log(self, level: int, name: str, message: str) -> None:
        with self.send_lock:
            if self.running is None:
                self.idle_logs.append((level, name, message))
            else:
                self.replies.send(_protocol.Reply(self.running, _protocol.LOG, (level, name, message)))

    def check_cancelled(self) -> None:
        """Raise if the parent cancelled the request being run (called between blocks)."""
        if self.cancelled.is_set():
            raise _Refused(_protocol.CANCELLED, "cancelled by the caller")

    def commit_point(self) -> None:
        """Ask the parent whether to commit; raise (so the caller rolls back) unless it says go.

        The parent refuses when its caller cancelled; once it said go it runs
        no more callbacks for this request, so nothing can cancel it afterwards.
        """
        self.check_cancelled()
        self.reply(_protocol.COMMIT, None)
        decision = self.decisions.get()
        if decision is not None and decision.id != self.running:
            raise _Refused("internal", f"a decision for request {decision.id} during request {self.running}")
        if decision is None or not decision.go:
            raise _Refused(_protocol.CANCELLED, "cancelled by the caller before the commit")

    def read_requests(self) -> None:
        """The reader thread: route each message from the parent as it arrives."""
        while True:
            try:
                message = self.requests.recv()
            except BaseException as exc:
                if not isinstance(exc, (EOFError, OSError)):
                    # A message this process cannot read (e.g. a transport class it
                    # cannot import): say why on stderr, which the parent reports.
                    traceback.print_exc()
                # The parent is gone or unreadable: stop whatever runs, without committing.
                self.cancelled.set()
                self.decisions.put(None)
                self.inbox.put(None)
                return
            if isinstance(message, _protocol.Request):
                with self.state_lock:
                    self.current = message.id
                    self.cancelled.clear()
                self.inbox.put(message)
            elif isinstance(message, _protocol.Cancel):
                with self.state_lock:
                    if message.id == self.current:
                        self.cancelled.set()
            elif isinstance(message, _protocol.Decision):
                self.decisions.put(message)

    # -- the loop ---------------------------------------------------------

    def serve(self) -> None:
        threading.Thread(target=self.read_requests, name="vbremote-requests", daemon=True).start()
        while True:
            request = self.inbox.get()
            if request is None:
                break
            with self.send_lock:
                self.running = request.id
                while self.idle_logs:
                    level, name, message = self.idle_logs.popleft()
                    self.replies.send(_protocol.Reply(request.id, _protocol.LOG, (level, name, message)))
            if request.op == "close":
                self.close()
                self.finish(_protocol.OK, None)
                break
            self.handler.errors.clear()
            try:
                result = getattr(self, "op_" + request.op)(**request.args)
            except Exception as exc:
                kind, message, context = classify(exc, self.handler.remote_lines)
                if kind == "internal":
                    logging.getLogger("vbremote.borg.worker").error(
                        "unexpected error in the borg worker:\n%s", traceback.format_exc()
                    )
                self.finish(_protocol.ERROR, (kind, message, context))
                if request.op in ("open", "init"):
                    break
            else:
                self.finish(_protocol.OK, result)
        self.close()

    def finish(self, kind: str, payload: Any) -> None:
        """Send the final reply of the request being run; the worker is idle after it."""
        with self.send_lock:
            assert self.running is not None
            self.replies.send(_protocol.Reply(self.running, kind, payload))
            self.running = None

    def close(self) -> None:
        early = sys.modules.pop("_vbremote_early_serve", None)
        if early is not None:  # started for a connect that never came
            _end(early.process)
        if self.repository is not None:
            repository, self.repository = self.repository, None
            try:
                repository.__exit__(None, None, None)
            except Exception:
                logging.getLogger("vbremote.borg.worker").exception("closing the repository failed")
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.encrypt_pool.shutdown(wait=False, cancel_futures=True)
        self.put_pool.shutdown(wait=False, cancel_futures=True)

    # -- opening ----------------------------------------------------------

    def _connect(self, transport: Any, *, create: bool, lock_wait: float, exclusive: bool) -> Any:
        from borg.helpers import Location
        from borg.remote import RemoteRepository
        from borg.repository import Repository

        self.location = transport.location
        command = transport.serve_command()
        if command is None:
            repository = Repository(
                transport.path, create=create, exclusive=exclusive, lock_wait=lock_wait,
                lock=True, make_parent_dirs=create,
            )
        else:
            argv = list(command)

            class CommandRepository(RemoteRepository):  # type: ignore[misc]
                """borg's remote repository, started by the transport's own command line."""

                def borg_cmd(self, args: Any, testing: bool) -> list[str]:
                    return []

                def ssh_cmd(self, location: Any) -> list[str]:
                    return argv

                def close(self) -> None:
                    # When the command fails, borg may see its stdout close before
                    # it has read the command's last words on stderr: read them now.
                    if self.p:
                        # Closing stdin ends borg serve; its stderr then ends too.
                        self.p.stdin.close()
                        partial: bytes = getattr(self, "stderr_received", b"")
                        _drain_stderr(self.p, partial)
                        self.stderr_received = b""
                    super().close()

            args = _RemoteArgs(upload_ratelimit=transport.upload_ratelimit)
            # borg wants a Location; the host part is never used since the
            # command line comes from the transport.
            location = Location(_borg_location(transport))
            with _started_early(argv):
                repository = CommandRepository(
                    location, create=create, exclusive=exclusive, lock_wait=lock_wait,
                    lock=True, make_parent_dirs=create, args=args,
                )
        repository.__enter__()
        self.repository = repository
        return repository

    def op_init(
        self, transport: Any, encryption: str, passphrase: str | None, lock_wait: float,
        block_size: int, compression: str,
    ) -> dict[str, Any]:
        from borg.cache import Cache
        from borg.crypto.key import key_creator, tam_required_file
        from borg.helpers import Location, Manifest

        transport = _load_transport(transport)
        _set_passphrase(passphrase, new=True)
        repository = self._connect(transport, create=True, lock_wait=lock_wait, exclusive=True)
        try:
            args = _InitArgs(encryption=encryption, location=Location(_borg_location(transport)))
            key = key_creator(repository, args)
            _guard_key(key, self.repository_lock)
            manifest = Manifest(key, repository)
            manifest.key = key
            manifest.config[_BLOCK_SIZE_KEY] = block_size
            manifest.write()
            repository.commit(compact=False)
            with Cache(repository, key, manifest, warn_if_unencrypted=False):
                pass
            if key.tam_required:
                open(tam_required_file(repository), "w").close()
        except Exception:
            # As borg init does: a repository without a usable key is no repository.
            self.repository = None
            _quietly(repository.destroy)
            _quietly(repository.close)
            raise
        self.key, self.manifest = key, manifest
        self._set_compression(compression)
        return self._describe(transport)

    def op_open(
        self, transport: Any, passphrase: str | None, lock_wait: float, exclusive: bool,
        compression: str,
    ) -> dict[str, Any]:
        from borg.cache import SecurityManager, assert_secure
        from borg.helpers import Manifest

        transport = _load_transport(transport)
        _set_passphrase(passphrase, new=False)
        repository = self._connect(transport, create=False, lock_wait=lock_wait, exclusive=exclusive)
        self.manifest, self.key = Manifest.load(repository, Manifest.NO_OPERATION_CHECK)
        _guard_key(self.key, self.repository_lock)
        _repair_cache_rollback(repository)
        assert_secure(repository, self.manifest, lock_wait)
        # borg asks this only when it first writes; refuse at open instead, and
        # remember the repository when the caller accepted it.
        SecurityManager(repository).assert_access_unknown(True, self.manifest, self.key)
        self._set_compression(compression)
        return self._describe(transport)

    def _set_compression(self, compression: str) -> None:
        # borg's key compresses what it encrypts; file data arrives compressed
        # already (see _Compression), archive metadata does not.
        self.key.compressor = _KeyCompressor(self._compression(compression).compressor)
        self.compression = compression

    def _compression(self, spec: str) -> _Compression:
        """The compression of one borg compression spec (refused when borg does not know it)."""
        from borg.compress import CompressionSpec

        found = self.compressions.get(spec)
        if found is None:
            try:
                compressor = CompressionSpec(spec).compressor
            except Exception as exc:  # borg raises argparse's error type here
                raise _Refused("config", f"invalid compression {spec!r}: {exc}") from exc
            found = self.compressions[spec] = _Compression(compressor)
        return found

    def _describe(self, transport: Any) -> dict[str, Any]:
        local_append_only = getattr(self.repository, "append_only", None)
        self.append_only = local_append_only if transport.serve_command() is None else transport.append_only
        return {
            "id": self.repository.id.hex(),
            "encryption": self.key.ARG_NAME,
            "id_hash": "blake2b" if "blake2" in (self.key.ARG_NAME or "") else "sha256",
            "append_only": self.append_only,
            "block_size": self.manifest.config.get(_BLOCK_SIZE_KEY),
        }

    def _reload_manifest(self) -> None:
        from borg.helpers import Manifest

        self.listing = None
        self.manifest, _ = Manifest.load(self.repository, Manifest.NO_OPERATION_CHECK, key=self.key)

    # While the repository is open we hold borg's lock (shared or exclusive),
    # so nobody else can change the manifest: the one loaded at open, kept
    # current by our own writes, is the repository's (it is reloaded after a
    # rollback).

    # -- reading ----------------------------------------------------------

    def op_archives(
        self, resend: frozenset[str] = frozenset(), checkpoints: bool = False
    ) -> list[tuple[str, str, datetime, str | None]]:
        """Every archive as (name, id, time, comment): the comment only the first
        time an archive is listed on this connection (or when its id is in ``resend``).

        Checkpoint archives (named as borg names them, see ``_Checkpoints``)
        are left out, as ``borg list`` leaves them out; ``checkpoints=True``
        lists only them.
        """
        from borg.item import ArchiveItem

        if self.listing is None:
            # Parsing every archive's time is the costly part of a listing.
            self.listing = list(self.manifest.archives.list(sort_by=("ts",)))
        everything = self.listing
        infos = [info for info in everything if bool(_CHECKPOINT.search(info.name)) == checkpoints]
        wanted = [info.id for info in infos if info.id not in self.sent or info.id.hex() in resend]
        comments: dict[bytes, str] = {}
        known = self._comment_cache() if wanted else {}
        fetch = [archive_id for archive_id in wanted if archive_id.hex() not in known]
        for archive_id in wanted:
            if archive_id.hex() in known:
                comments[archive_id] = known[archive_id.hex()]
        # get_many pipelines the reads (one round trip for all, remotely).
        for archive_id, cdata in zip(fetch, self.repository.get_many(fetch), strict=True):
            data = self.key.decrypt(archive_id, cdata)
            archive, _, _ = self.key.unpack_and_verify_archive(data, force_tam_not_required=True)
            comments[archive_id] = ArchiveItem(internal_dict=archive).get("comment", "")
        if fetch:
            self._save_comment_cache(comments, {info.id.hex() for info in everything})
        self.sent.update(wanted)
        return [
            (info.name, info.id.hex(), info.ts.replace(tzinfo=UTC) if info.ts.tzinfo is None else info.ts,
             comments.get(info.id))
            for info in infos
        ]

    # Archive metadata never changes for a given archive id (the id is the
    # keyed hash of the metadata, comment included), so what was read is kept
    # on disk beside borg's own cache, and a new connection reads it from
    # there instead of fetching every archive again.
    #
    # That file is not the repository: whoever can write it must not be able
    # to make a listing say what the repository does not. Each entry carries
    # an HMAC-SHA256 over the repository id, the archive id and the comment,
    # keyed with a key derived from the repository key's id key, so an entry
    # cannot be forged, altered or moved to another archive without the key;
    # one that fails is ignored and the archive is fetched again. An
    # unencrypted ("none") repository has no secret to key it with, so it gets
    # no cache file at all. The parent checks every comment it receives either
    # way (_models.decode_comment).

    def _comment_cache_path(self) -> str:
        from borg.helpers import get_cache_dir

        return os.path.join(get_cache_dir(), "vbremote", self.repository.id.hex() + ".json")

    def _comment_cache_key(self) -> bytes | None:
        """The MAC key of the cache file, or None when the repository key holds no secret."""
        id_key = getattr(self.key, "id_key", None)
        # "none" has no id key; "authenticated" opened without its key has an all-zero one.
        if not isinstance(id_key, bytes | bytearray) or len(id_key) < 32 or not any(id_key):
            return None
        # A fixed label as the HMAC key and the secret as the message: the
        # result differs from every chunk id (those are keyed with id_key itself).
        return hmac.new(_COMMENT_CACHE_LABEL, bytes(id_key), hashlib.sha256).digest()

    def _comment_mac(self, mac_key: bytes, archive_id: bytes, comment: str) -> str:
        message = bytes(self.repository.id) + archive_id + comment.encode("utf-8", "surrogatepass")
        return hmac.new(mac_key, message, hashlib.sha256).hexdigest()

    def _comment_cache(self) -> dict[str, str]:
        """The cached comments whose MAC holds, by archive id (hex)."""
        mac_key = self._comment_cache_key()
        if mac_key is None:
            return {}
        try:
            with open(self._comment_cache_path(), encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError, RecursionError):
            return {}
        if not isinstance(data, dict) or data.get("format") != _COMMENT_CACHE_FORMAT:
            return {}
        entries = data.get("entries")
        if not isinstance(entries, dict):
            return {}
        good: dict[str, str] = {}
        for archive_hex, entry in entries.items():
            if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(v, str) for v in entry)):
                continue
            comment, mac = entry
            try:
                archive_id = bytes.fromhex(archive_hex)
            except ValueError:
                continue
            if len(archive_id) == 32 and hmac.compare_digest(self._comment_mac(mac_key, archive_id, comment), mac):
                good[archive_hex] = comment
        return good

    def _save_comment_cache(self, comments: dict[bytes, str], live: set[str]) -> None:
        mac_key = self._comment_cache_key()
        if mac_key is None:
            return
        cache = {k: v for k, v in self._comment_cache().items() if k in live}
        cache.update({archive_id.hex(): comment for archive_id, comment in comments.items()})
        entries = {
            archive_hex: [comment, self._comment_mac(mac_key, bytes.fromhex(archive_hex), comment)]
            for archive_hex, comment in cache.items()
        }
        path = self._comment_cache_path()
        temporary = f"{path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(temporary, "w", encoding="utf-8") as f:
                json.dump({"format": _COMMENT_CACHE_FORMAT, "entries": entries}, f, separators=(",", ":"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except OSError:
            # A cache that cannot be written only costs the next listing time.
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            logging.getLogger("vbremote.borg.worker").debug("cannot write %s", path, exc_info=True)

    def _archive(self, name: str, cache: Any = None) -> Any:
        from borg.archive import Archive

        return Archive(self.repository, self.key, self.manifest, name, cache=cache)

    def op_chunk_list(self, archive: str, path: str) -> tuple[int, list[tuple[bytes, int]]]:
        found = None
        for item in self._archive(archive).iter_items(filter=lambda item: item.path == path):
            found = item
        if found is None or "chunks" not in found:
            raise _Refused("file_missing", f"archive {archive!r} has no file {path!r}", archive=archive, path=path)
        chunks = [(bytes(c.id), int(c.size)) for c in found.chunks]
        return sum(size for _, size in chunks), chunks

    def op_chunk_lists(
        self, archive: str, max_items: int, max_chunks: int
    ) -> list[tuple[Any, ...]]:
        """Every item of an archive in one pass: (path, mode, size or None,
        chunks [(id, size)] or None, source or None, hardlink_master).

        Raw, as stored: the parent validates (the archive is untrusted input);
        only the number of items and chunks is checked here, as they are read.
        """
        if archive not in self.manifest.archives:
            raise _Refused("archive_missing", f"no archive named {archive!r}")
        rows: list[tuple[Any, ...]] = []
        chunk_count = 0
        for item in self._archive(archive).iter_items():
            # An archive is untrusted input: its listing is refused before it can take the memory of both
            # processes, not after (a hostile one may claim any number of items and chunks).
            chunk_count += len(item.chunks) if "chunks" in item else 0
            if len(rows) >= max_items or chunk_count > max_chunks:
                raise _Refused(
                    "archive_invalid",
                    f"archive {archive!r} lists more than {max_items} items or {max_chunks} chunks;"
                    " refused as absurd", archive=archive)
            chunks = [(bytes(c.id), int(c.size)) for c in item.chunks] if "chunks" in item else None
            size = item.get("size")
            rows.append((
                str(item.path), int(item.mode), None if size is None else int(size), chunks,
                None if "source" not in item else str(item.source), bool(item.get("hardlink_master", False)),
            ))
        return rows

    def op_id_key(self) -> dict[str, Any]:
        """The key's id function for the parent, which hashes local data itself
        (see ``_idhash``): its construction, its key, and borg's id of a probe."""
        from borg.crypto.key import ID_HMAC_SHA_256, ID_BLAKE2b_256, PlaintextKey

        if isinstance(self.key, ID_BLAKE2b_256):
            algorithm, key = "blake2b-256", bytes(self.key.id_key)
        elif isinstance(self.key, ID_HMAC_SHA_256):
            algorithm, key = "hmac-sha256", bytes(self.key.id_key)
        elif isinstance(self.key, PlaintextKey):
            algorithm, key = "sha256", b""
        else:
            raise _Refused("config", f"unsupported borg key type {type(self.key).__name__}")
        return {"algorithm": algorithm, "key": key, "probe_id": bytes(self.key.id_hash(PROBE))}

    def op_set_read_ahead(self, limit: int) -> None:
        if limit < 1:
            raise _Refused("config", "read_ahead must be at least 1 byte")
        self.read_ahead = limit

    def op_stats(self, reset: bool = False) -> dict[str, int]:
        """Measurements for tests and benchmarks: the peak of bytes read ahead,
        the calls of borg's get_many (each ends with the request pipeline
        drained: a round trip), and this process's peak resident memory."""
        if not getattr(self.repository.get_many, "vbremote_counted", False):
            original = self.repository.get_many

            def get_many(*args: Any, **kwargs: Any) -> Any:
                self.get_many_calls += 1
                return original(*args, **kwargs)

            get_many.vbremote_counted = True  # type: ignore[attr-defined]
            self.repository.get_many = get_many
        out = {
            "read_ahead_peak": self.read_ahead_meter.peak,
            "read_ahead_held": self.read_ahead_meter.held,
            "get_many_calls": self.get_many_calls,
            "peak_rss": _peak_rss(),
        }
        if reset:
            self.read_ahead_meter.peak = self.read_ahead_meter.held
            self.get_many_calls = 0
        return out

    def op_fetch(self, ids: list[bytes], errors: str = "raise") -> None:
        """Stream (id, plaintext, None) for each id, verified, in order; one pipelined get_many.

        A chunk that is missing or fails verification raises (``errors="raise"``)
        or is streamed as (id, None, message) and the rest follow (``"report"``).

        borg's ``key.decrypt`` does three things in turn: authenticate and
        decrypt (one cipher context, which holds the GIL), decompress, and check
        the plaintext's id. Here this thread authenticates and decrypts; the
        pool decompresses (one at a time: borg's decompressors share one
        buffer, but release the GIL while they work) and checks each id (the
        hash releases the GIL, so several run at once); a sender thread sends
        the results in order. Every chunk still passes all three steps before
        it is sent.
        """
        sender = _FetchSender(self, errors)
        ahead: _SegmentReadAhead | None = None
        position = 0
        stop = False
        try:
            ahead = _SegmentReadAhead.start(self.repository, ids)  # inside: a failed start stops the sender too
            while position < len(ids) and not stop and not sender.stopped:
                # borg's get_many ends at the first missing or damaged object; ask again after it.
                replies = self.repository.get_many(ids[position:])
                try:
                    for chunk_id in ids[position:]:
                        position += 1
                        try:
                            cdata = next(replies)
                            # Authenticated (MAC) and decrypted; still compressed.
                            payload = self.key.decrypt(chunk_id, cdata, decompress=False)
                        except Exception as exc:
                            message = self._chunk_error(chunk_id, exc)  # re-raises what is not about this chunk
                            sender.put_error(chunk_id, message, exc)
                            if errors == "raise" or not _generator_alive(replies):
                                stop = errors == "raise"
                                break
                            continue
                        sender.put(chunk_id, self.pool.submit(self._decode, chunk_id, payload), len(payload))
                        if ahead is not None:
                            ahead.reached(position)
                        if sender.stopped:
                            break
                finally:
                    replies.close()
                    self._forget_pipeline()
        except BaseException:
            sender.finish(abort=True)
            raise
        finally:
            if ahead is not None:
                ahead.stop()
        sender.finish()

    def _decode(self, chunk_id: bytes, payload: Any) -> bytes:
        """Decompress a decrypted payload and check its id (what borg's key.decrypt does after decrypting)."""
        with self.decompress_lock:
            data = bytes(self.key.decompress(payload))
        self.key.assert_id(chunk_id, data)
        return data

    @staticmethod
    def _chunk_error(chunk_id: bytes, exc: Exception) -> str:
        from borg.helpers import IntegrityError
        from borg.repository import Repository

        if not isinstance(exc, (IntegrityError, Repository.ObjectNotFound)):
            raise exc
        return f"chunk {chunk_id.hex()}: {exc.get_message()}"

    def _forget_pipeline(self) -> None:
        """Read and drop the answers to gets that a stopped get_many still had in flight.

        borg files them under its async responses, where they would wait (and
        take memory) until the next write; read them now, while they arrive.
        """
        repository = self.repository
        if not (getattr(repository, "ignore_responses", None) or getattr(repository, "async_responses", None)):
            return  # a local repository, or nothing left in flight
        from borg.helpers import IntegrityError
        from borg.repository import Repository

        drain = self.repository.async_response
        while True:
            try:
                if drain(wait=True) is None:
                    return
            except (IntegrityError, Repository.ObjectNotFound):
                continue  # the error answer to a get nobody waits for any more
            except Exception:
                # The connection itself failed; the next call reports it.
                logging.getLogger("vbremote.borg.worker").debug("draining the fetch pipeline failed", exc_info=True)
                return

    def _blocks(
        self, fd: int, size: int, params: tuple[int, int], path: str, chunks: Any, compression: _Compression,
        *, limit: int,
    ) -> Iterator[_Block]:
        """The file's fixed blocks in order: read, hashed and, unless the chunk
        index has them, compressed, in parallel threads.

        Each thread reads into a buffer of its own, used again for every block
        (fresh memory for each block costs more than the copy into it), and
        hands on only the id and, for a block the index lacks, its compressed
        data. ``os.preadv``, hashlib and hmac, and lz4 (see ``_Compression``)
        release the GIL, so the threads run in parallel with each other and
        with the caller's encryption and storing. At most ``limit`` bytes of
        blocks are in flight (at least one block), whatever the number of
        CPUs: memory, not threads, is what a large host would run out of.

        The caller decides again, in file order, which blocks are new: a block
        comes without data although it is new when a later block with the
        same content was read first (see ``_compress_again``).
        """
        id_hash = self.key.id_hash
        zero_ids: dict[int, bytes] = {}
        meter = self.read_ahead_meter
        buffers = threading.local()
        claims: dict[bytes, int] = {}

        def job(offset: int, length: int) -> _Block:
            buffer: bytearray | None = getattr(buffers, "buffer", None)
            if buffer is None or len(buffer) < length:
                buffer = buffers.buffer = bytearray(max(length, params[0]))
            view = memoryview(buffer)[:length]
            if os.preadv(fd, [view], offset) != length:
                raise _Refused("changed", f"{path}: file shrank while it was read")
            zero = ZERO.startswith(view)
            if zero:
                block_id = zero_ids.get(length)
                if block_id is None:
                    block_id = zero_ids[length] = id_hash(ZERO[:length])
            else:
                block_id = id_hash(view)
            data = None
            # The first block of its content to get here compresses it; a
            # repeat of it in flight does not (the caller refers to the first).
            if block_id not in chunks and claims.setdefault(block_id, offset) == offset:
                data = compression.zeros(length) if zero else compression.compress(view)
            return _Block(offset, length, block_id, data, zero)

        pending: collections.deque[tuple[concurrent.futures.Future[_Block], int]] = collections.deque()
        held = 0

        def oldest() -> _Block:
            nonlocal held
            future, length = pending.popleft()
            block = future.result()
            # What the caller keeps is the caller's to count (see _store_blocks).
            held -= length
            meter.give(length)
            return block

        try:
            for offset, length in _extents(size, *params):
                while pending and held + length > limit:
                    yield oldest()
                held += length
                meter.take(length)
                pending.append((self.pool.submit(job, offset, length), length))
            while pending:
                yield oldest()
        finally:
            for future, length in pending:
                future.cancel()
                meter.give(length)
            # A block being read must be done before its file is closed.
            concurrent.futures.wait([future for future, _ in pending])

    def _compress_again(self, fd: int, block: _Block, path: str, compression: _Compression) -> bytes:
        """The compressed data of a new block that came without it.

        That happens when a later block with the same content was read first
        (threads race) and so compressed it instead, or, all but never, when
        the chunk index had the block when it was read and no longer has it
        (a checkpoint removes the metadata chunk of its own archive). The data
        is read again and must still have the block's id.
        """
        data = os.pread(fd, block.size, block.offset)
        if len(data) != block.size or self.key.id_hash(data) != block.id:
            raise _Refused("changed", f"{path}: file changed while it was read")
        return compression.compress(data)

    # -- writing ----------------------------------------------------------

    def op_write(
        self, name: str, files: list[dict[str, Any]], comment: str, timestamp: datetime | None,
        checkpoint_interval: float | None = None, supersede: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """Write one archive; commit a checkpoint archive every ``checkpoint_interval``
        seconds of writing; with the archive, delete the checkpoint archives ``supersede``.

        Each file is compressed with its ``compression`` (a borg compression
        spec) when it has one, else with the repository's.
        """
        from borg.archive import Archive, Statistics, cached_hash
        from borg.chunker import get_chunker
        from borg.constants import CHUNKER_PARAMS

        if name in self.manifest.archives:
            raise _Refused("archive_exists", f"archive {name!r} already exists", archive=name)
        # Each file's compression (e.g. zstd for a saved state), checked before anything is written.
        compressions = [
            self._compression(self.compression if f.get("compression") is None else f["compression"]) for f in files
        ]
        fixed = [f for f in files if f["chunking"][0] == "fixed"]
        archive_chunker = tuple(fixed[0]["chunking"]) if fixed else CHUNKER_PARAMS
        total = sum(os.stat(f["source"]).st_size for f in files)
        counts = {"read": 0, "new": 0, "stored": 0, "chunks": 0, "chunks_new": 0, "zero": 0}
        # archive.save() writes the manifest and commits.
        with self._transaction(commit=False) as cache:
            archive = Archive(
                self.repository, self.key, self.manifest, name, cache=cache, create=True,
                chunker_params=archive_chunker, noatime=True, noflags=True, noacls=True, noxattrs=True,
            )
            stats = archive.stats
            checkpoints = _Checkpoints(self, archive, cache, checkpoint_interval, comment, _naive_utc(timestamp))
            progress = _Progress(self, total)

            def add(chunk_id: bytes, data: bytes, zero: bool, compression: _Compression) -> Any:
                counts["chunks"] += 1
                counts["zero"] += zero
                if cache.seen_chunk(chunk_id, len(data)):
                    return cache.chunk_incref(chunk_id, stats)
                cdata = self.key.encrypt(_Compressed(compression.compress(data)))
                self.repository.put(chunk_id, cdata, wait=False)
                self.repository.async_response(wait=False)
                return self._stored(cache, stats, counts, chunk_id, len(data), len(cdata))

            for spec, compression in zip(files, compressions, strict=True):
                with open(spec["source"], "rb") as f:
                    fd = f.fileno()
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode):
                        raise _Refused("config", f"{spec['source']} is not a regular file")
                    if st.st_size != spec["size"]:
                        # The metadata records the size the caller saw.
                        raise _Refused("changed", f"{spec['path']}: file changed size before it was read")
                    item = _item(spec["path"], st)
                    entries: list[Any] = []
                    checkpoints.start_file(item, entries, counts, total)
                    if spec["chunking"][0] == "fixed":
                        params = (spec["chunking"][1], spec["chunking"][2])
                        self._store_blocks(
                            fd, st.st_size, params, spec["path"], cache, stats, counts, entries, checkpoints,
                            compression, progress,
                        )
                    else:
                        chunker = get_chunker(*spec["chunking"], seed=self.key.chunk_seed)
                        for chunk in chunker.chunkify(f, fd):
                            chunk_id, data = cached_hash(chunk, self.key.id_hash)
                            zero = chunk.meta["allocation"] != 0
                            entries.append(add(chunk_id, data, zero, compression))
                            counts["read"] += len(data)
                            progress.block(spec["path"], counts["read"])
                            if checkpoints.due():
                                checkpoints.write()
                    progress.file_done(spec["path"], counts["read"])
                    if sum(e.size for e in entries) != st.st_size:
                        raise _Refused("changed", f"{spec['path']}: file changed size while it was read")
                    checkpoints.finish_file(stats)
                    item.chunks = entries
                    item.get_size(memorize=True)
                    stats.nfiles += 1
                    archive.add_item(item, show_progress=False)
            # Earlier checkpoints (of crashed runs) go with the commit of the
            # archive that holds what they held; this write's own are already
            # out of the manifest it will write (borg's Archive.write_checkpoint).
            for old in supersede:
                if _CHECKPOINT.search(old) and old in self.manifest.archives:
                    self._archive(old, cache).delete(Statistics(), forced=False)
            self.commit_point()
            archive.save(comment=comment, timestamp=_naive_utc(timestamp))
            info = self.manifest.archives[name]
            self.sent.add(info.id)  # the parent knows what it wrote
        counts_out: dict[str, Any] = dict(counts)
        counts_out.update(
            id=info.id.hex(), time=info.ts.replace(tzinfo=UTC), checkpoints=checkpoints.written,
            superseded=[old for old in supersede if old not in self.manifest.archives],
        )
        return counts_out

    @staticmethod
    def _stored(cache: Any, stats: Any, counts: dict[str, int], chunk_id: bytes, size: int, csize: int) -> Any:
        """Record a chunk just sent to the repository, as borg's ``Cache.add_chunk`` does; its chunk list entry."""
        from borg.item import ChunkListEntry

        cache.chunks.add(chunk_id, 1, size, csize)
        stats.update(size, csize, True)
        counts["chunks_new"] += 1
        counts["new"] += size
        counts["stored"] += csize
        return ChunkListEntry(chunk_id, size, csize)

    def _store_blocks(
        self, fd: int, size: int, params: tuple[int, int], path: str, cache: Any, stats: Any,
        counts: dict[str, int], entries: list[Any], checkpoints: _Checkpoints, compression: _Compression,
        progress: _Progress,
    ) -> None:
        """Store a file's fixed blocks through a pipeline of threads.

        Threads read, hash and compress blocks ahead (``_blocks``). One thread
        encrypts the new ones, in file order (the cipher takes its nonces in
        order, and borg's encryption holds the GIL); one more stores them, in
        the same order (the repository is one connection; its writes release
        the GIL). This thread decides in file order which blocks are new and
        does the chunk bookkeeping of borg's ``Cache.add_chunk``; nothing else
        touches the key while blocks are in flight, and the repository only
        under ``repository_lock`` (the put thread, and borg's nonce manager on
        the encrypt thread: see ``_guard_key``).

        The read-ahead limit is shared: half for blocks being read and
        hashed, half for new blocks waiting here (compressed and encrypted,
        counted as twice the block); known blocks carry no data.

        The file's chunk list entries are appended to ``entries`` as blocks
        are stored. When a checkpoint is due, the blocks in flight are stored
        first (so nothing else uses the key or the repository while the
        checkpoint is committed), then the checkpoint is committed.
        """
        key = self.key
        repository = self.repository
        limit = max(1, self.read_ahead // 2)
        meter = self.read_ahead_meter
        held = 0
        in_flight: set[bytes] = set()
        queue: collections.deque[tuple[_Block, _Sealing | None]] = collections.deque()

        def put(block_id: bytes, cdata: bytes) -> None:
            with self.repository_lock:
                repository.put(block_id, cdata, wait=False)
                repository.async_response(wait=False)

        def encrypt(block_id: bytes, data: bytes) -> tuple[int, concurrent.futures.Future[None]]:
            cdata = key.encrypt(_Compressed(data))
            return len(cdata), self.put_pool.submit(put, block_id, cdata)

        def finish() -> None:
            nonlocal held
            block, sealing = queue.popleft()
            if sealing is None:  # known to the repository, or an earlier block of this file
                entries.append(cache.chunk_incref(block.id, stats))
            else:
                held -= 2 * block.size
                meter.give(2 * block.size)
                csize, stored = sealing.result()
                stored.result()
                entries.append(self._stored(cache, stats, counts, block.id, block.size, csize))
                in_flight.discard(block.id)
            counts["chunks"] += 1
            counts["zero"] += block.zero
            counts["read"] += block.size
            progress.block(path, counts["read"])

        try:
            for block in self._blocks(fd, size, params, path, cache.chunks, compression, limit=limit):
                if block.id in in_flight or cache.seen_chunk(block.id, block.size):
                    block.data = None
                    queue.append((block, None))
                else:
                    data = block.data
                    if data is None:
                        data = self._compress_again(fd, block, path, compression)
                    block.data = None
                    while queue and held + 2 * block.size > limit:
                        finish()
                    in_flight.add(block.id)
                    held += 2 * block.size
                    meter.take(2 * block.size)
                    queue.append((block, self.encrypt_pool.submit(encrypt, block.id, data)))
                while queue and _ready(queue[0][1]):
                    finish()
                if checkpoints.due():
                    while queue:
                        finish()
                    checkpoints.write()
            while queue:
                finish()
        finally:
            for block, sealing in queue:
                if sealing is not None:
                    sealing.cancel()
                    meter.give(2 * block.size)
            # Blocks still being encrypted or stored (after an error) must be
            # done before anything else may use the key or the repository.
            for _, sealing in queue:
                if sealing is not None and not sealing.cancelled():
                    with contextlib.suppress(Exception):
                        sealing.result()[1].exception()

    def _progress(self, operation: str, path: str, done: int, total: int) -> None:
        # Between blocks: the place where a cancelled operation stops.
        self.check_cancelled()
        self.reply(_protocol.PROGRESS, (operation, path, done, total))

    # -- deleting, compacting, checking ----------------------------------

    @contextlib.contextmanager
    def _transaction(self, *, commit: bool = True) -> Iterator[Any]:
        """borg's chunk cache for one change; committed at the end (unless the
        body committed itself), rolled back with the repository on any error."""
        from borg.cache import Cache

        self.listing = None
        with Cache(self.repository, self.key, self.manifest, lock_wait=1.0) as cache:
            try:
                yield cache
                if commit:
                    self.commit_point()
                    self.manifest.write()
                    self.repository.commit(compact=False)
                    cache.commit()
            except BaseException:
                _quietly(self.repository.rollback)
                _quietly(cache.rollback)
                _quietly(self._reload_manifest)
                raise

    def op_delete(self, names: list[str]) -> list[str]:
        from borg.archive import Statistics

        missing = [n for n in names if n not in self.manifest.archives]
        if missing:
            raise _Refused("archive_missing", f"no archive named {missing[0]!r}", archive=missing[0])
        stats = Statistics()
        with self._transaction() as cache:
            for name in names:
                self._archive(name, cache).delete(stats, forced=False)
        return names

    def op_set_comment(self, name: str, comment: str) -> str:
        """Replace an archive's comment (borg's set_meta: the archive gets a new id)."""
        if name not in self.manifest.archives:
            raise _Refused("archive_missing", f"no archive named {name!r}", archive=name)
        with self._transaction() as cache:
            self._archive(name, cache).set_meta("comment", comment)
        new_id = self.manifest.archives[name].id
        self.sent.add(new_id)
        return str(new_id.hex())

    def op_compact(self) -> None:
        from borg.helpers import Manifest

        # As borg's own compact does: rewrite the manifest to open a transaction.
        data = self.repository.get(Manifest.MANIFEST_ID)
        self.repository.put(Manifest.MANIFEST_ID, data)
        self.repository.commit(compact=True, threshold=0.1)

    def op_check(self, verify_data: bool) -> tuple[bool, list[str]]:
        from borg.archive import ArchiveChecker

        ok = bool(self.repository.check(repair=False))
        if ok:
            ok = bool(ArchiveChecker().check(
                self.repository, repair=False, verify_data=verify_data, sort_by="ts"
            ))
        return ok, list(self.handler.errors)



class _Checkpoints:
    """The checkpoint archives of one write, made as ``borg create --checkpoint-interval`` makes them.

    borg 1.4.5 (borg/archive.py: ``ChunksProcessor.maybe_checkpoint``,
    ``write_part_file``, ``Archive.write_checkpoint``): when the interval has
    passed, the chunks of the current file stored since its last part go into
    a part item (path ``<path>.borg_part_N``, ``part = N``, hidden from
    extraction and from vbremote's readers), and the archive as it stands is
    committed under the checkpoint name (``<name>.checkpoint``, or
    ``.checkpoint.N`` when that is taken). The checkpoint is then dropped from
    the manifest in memory and its metadata chunk released, so the next
    checkpoint (same name) replaces it and the final archive's commit removes
    it. A file that got parts gets a last part for its remaining chunks, and
    its whole item then references every chunk once more, so the archive's
    reference counts stay those of its items (parts included).

    What a checkpoint commits stays in the repository when the writer dies:
    the next write finds those chunks in the chunk index and does not send
    them again. The checkpoint carries the archive's comment, so the next
    write of the same VM knows which checkpoints its archive supersedes.
    """

    def __init__(
        self, worker: Worker, archive: Any, cache: Any, interval: float | None, comment: str,
        timestamp: datetime | None,
    ) -> None:
        self.worker = worker
        self.archive = archive
        self.cache = cache
        self.interval = interval
        self.comment = comment
        self.timestamp = timestamp
        self.last = time.monotonic()
        self.written = 0
        self.item: Any = None
        self.entries: list[Any] = []
        self.counts: dict[str, int] = {}
        self.total = 0
        self.from_chunk = 0
        self.part = 1

    def start_file(self, item: Any, entries: list[Any], counts: dict[str, int], total: int) -> None:
        self.item, self.entries, self.counts, self.total = item, entries, counts, total
        self.from_chunk, self.part = 0, 1

    def due(self) -> bool:
        return self.interval is not None and time.monotonic() - self.last > self.interval

    def write(self) -> None:
        """Commit a checkpoint of everything stored so far (no blocks may be in flight)."""
        from borg.item import Item

        part = Item(internal_dict=self.item.as_dict())
        part.chunks = self.entries[self.from_chunk :]
        part.get_size(memorize=True, from_chunks=True)
        part.path += f".borg_part_{self.part}"
        part.part = self.part
        self.from_chunk = len(self.entries)
        self.part += 1
        archive = self.archive
        archive.add_item(part, show_progress=False)
        archive.save(archive.checkpoint_name, comment=self.comment, timestamp=self.timestamp)
        del archive.manifest.archives[archive.checkpoint_name]
        self.cache.chunk_decref(archive.id, archive.meta_stats)
        self.worker.listing = None
        self.written += 1
        self.last = time.monotonic()
        logging.getLogger("vbremote.borg.worker").info(
            "checkpoint %s committed at %d bytes", archive.checkpoint_name, self.counts["read"]
        )
        self.worker._progress("checkpoint", str(self.item.path), self.counts["read"], self.total)

    def finish_file(self, stats: Any) -> None:
        """After a file's last chunk: its last part, and the whole file's extra references."""
        if self.part == 1:
            return
        if self.entries[self.from_chunk :]:
            self.write()
        for entry in self.entries:
            self.cache.chunk_incref(entry.id, stats, size=entry.size, part=True)
        stats.nfiles_parts += self.part - 1


class _FetchSender:
    """The sending end of a fetch: results in order, from a thread of its own.

    The fetching thread hands over each chunk as a future of its plaintext (or
    the error that stopped it); this thread waits for each in turn and sends
    it, so decrypting the next chunks goes on while one is sent. At most
    :data:`_FETCH_AHEAD_BYTES` of payload (and :data:`_FETCH_AHEAD_CHUNKS`
    chunks) wait here. The first failure (a bad chunk with ``errors="raise"``,
    a cancel, a broken pipe) stops the fetch; :meth:`finish` raises it.
    """

    def __init__(self, worker: Worker, errors: str) -> None:
        self.worker = worker
        self.errors = errors
        self.queue: queue.Queue[
            tuple[bytes, concurrent.futures.Future[bytes] | None, tuple[str, Exception] | None, int] | None
        ] = queue.Queue(
            maxsize=_FETCH_AHEAD_CHUNKS
        )
        self.budget = Budget(_FETCH_AHEAD_BYTES)
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self.run, name="vbremote-fetch-send", daemon=True)
        self.thread.start()

    @property
    def stopped(self) -> bool:
        return self.failure is not None

    def put(self, chunk_id: bytes, future: concurrent.futures.Future[bytes], size: int) -> None:
        """Queue the next chunk as the future of its checked plaintext (``size``: its payload's bytes)."""
        self.budget.take(size)
        self.queue.put((chunk_id, future, None, size))

    def put_error(self, chunk_id: bytes, message: str, error: Exception) -> None:
        """Queue the next chunk as the error that stopped it."""
        self.queue.put((chunk_id, None, (message, error), 0))

    def run(self) -> None:
        while (entry := self.queue.get()) is not None:
            chunk_id, future, error, size = entry
            try:
                if self.failure is None:
                    self.send(chunk_id, future, error)
                elif future is not None:
                    future.cancel()
            except BaseException as exc:  # raised by finish(), in the fetching thread
                self.failure = exc
            finally:
                self.budget.give(size)

    def send(
        self, chunk_id: bytes, future: concurrent.futures.Future[bytes] | None, error: tuple[str, Exception] | None
    ) -> None:
        if future is not None:
            try:
                data = future.result()
            except Exception as exc:
                error = (self.worker._chunk_error(chunk_id, exc), exc)  # re-raises what is not about the chunk
            else:
                self.worker.item_data((chunk_id, data, None), 1)
                return
        assert error is not None
        message, cause = error
        if self.errors == "raise":
            raise _Refused("integrity", message, chunk_id=chunk_id.hex()) from cause
        self.worker.item((chunk_id, None, message))

    def finish(self, *, abort: bool = False) -> None:
        """Wait until every queued chunk is sent (or dropped: after a failure, or with ``abort``); raise the failure."""
        if abort and self.failure is None:
            self.failure = _Refused(_protocol.CANCELLED, "the fetch stopped")
        self.budget.close()
        self.queue.put(None)
        self.thread.join()
        if self.failure is not None and not abort:
            raise self.failure


class _SegmentReadAhead:
    """Asks the kernel to read the segment entries of the next chunks of a fetch ahead of borg (local only).

    borg reads each entry with a plain read where it lies, one after the
    other, and drops the segment files from the page cache when it closes
    them; so a fetch waits for the disk at every chunk, at the disk's speed
    for small sequential reads. This thread looks up where the coming
    chunks are (the repository index), reads each entry's header for its
    size and asks for the entry with ``POSIX_FADV_WILLNEED``, at most
    :data:`_READ_AHEAD_CHUNKS` chunks and :data:`_READ_AHEAD_BYTES` bytes
    ahead of the fetch; the reads then find the data in memory. It reads
    nothing into this process but headers, and changes nothing: a hint that
    fails is simply not given.
    """

    def __init__(self, index: Any, io: Any, ids: list[bytes]) -> None:
        self.index = index
        self.io = io
        self.ids = ids
        self.position = 0
        self.stopped = False
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self.run, name="vbremote-read-ahead", daemon=True)

    @classmethod
    def start(cls, repository: Any, ids: list[bytes]) -> _SegmentReadAhead | None:
        """The read-ahead of a fetch of ``ids``; None for a remote repository (or one not open yet)."""
        index = getattr(repository, "index", None)
        io = getattr(repository, "io", None)
        if index is None or io is None or not hasattr(os, "posix_fadvise"):
            return None
        ahead = cls(index, io, ids)
        ahead.thread.start()
        return ahead

    def reached(self, position: int) -> None:
        """The fetch has read the entries of ``ids[:position]``."""
        with self.changed:
            self.position = position
            self.changed.notify()

    def stop(self) -> None:
        with self.changed:
            self.stopped = True
            self.changed.notify()
        self.thread.join()

    def run(self) -> None:
        fds: dict[int, int] = {}
        header = self.io.put_header_fmt
        pending: collections.deque[tuple[int, int]] = collections.deque()  # (position, bytes) asked for
        asked = 0
        try:
            for i, chunk_id in enumerate(self.ids):
                with self.changed:
                    while True:
                        while pending and pending[0][0] < self.position:
                            asked -= pending.popleft()[1]
                        if self.stopped:
                            return
                        if len(pending) < _READ_AHEAD_CHUNKS and asked < _READ_AHEAD_BYTES:
                            break
                        self.changed.wait()
                try:
                    segment, offset = self.index[chunk_id]
                    fd = fds.get(segment)
                    if fd is None:
                        fd = fds[segment] = os.open(self.io.segment_filename(segment), os.O_RDONLY | os.O_CLOEXEC)
                    _crc, size, _tag, _key = header.unpack(os.pread(fd, header.size, offset))
                    os.posix_fadvise(fd, offset, size, os.POSIX_FADV_WILLNEED)
                except Exception:
                    continue  # no hint for this one: borg reads (and checks) it as always
                pending.append((i, size))
                asked += size
        finally:
            for fd in fds.values():
                os.close(fd)


def _guard_key(key: Any, repository_lock: threading.Lock) -> None:
    """Make a borg key safe for this worker's long session and its write threads.

    Nonces: borg 1.4.5's AES-CTR keys use one cipher object both ways, and a
    decrypt sets its counter to the decrypted object's (crypto/low_level.pyx
    ``AES256_CTR_BASE.decrypt`` calls ``set_iv``); the next encrypt starts at
    ``cipher.next_iv()``, which the nonce manager accepts as long as it lies
    inside the current reservation (crypto/nonces.py ``ensure_reservation``).
    A borg command rarely decrypts between two encrypts; this worker does
    (listing, fetching, chunk lists, the manifest reloaded after a rollback
    between two writes), so every decrypt puts the counter back where it was.

    The repository: when a reservation runs out (every 2**28 cipher blocks),
    the nonce manager asks the repository for the next one from inside
    ``key.encrypt``, on the encrypt thread, while the put thread may be in
    the middle of a put; borg's RemoteRepository is not thread-safe, so both
    take ``repository_lock``.
    """
    cipher = getattr(key, "cipher", None)
    if cipher is not None and hasattr(cipher, "next_iv"):
        decrypt = key.decrypt

        def decrypt_keeping_the_counter(*args: Any, **kwargs: Any) -> Any:
            following = key.cipher.next_iv()
            try:
                return decrypt(*args, **kwargs)
            finally:
                key.cipher.set_iv(following)

        key.decrypt = decrypt_keeping_the_counter
    manager = getattr(key, "nonce_manager", None)
    if manager is not None:
        for name in ("get_repo_free_nonce", "commit_repo_nonce_reservation"):
            method = getattr(manager, name)

            def guarded(*args: Any, _method: Any = method, **kwargs: Any) -> Any:
                with repository_lock:
                    return _method(*args, **kwargs)

            setattr(manager, name, guarded)


def _repair_cache_rollback(repository: Any) -> None:
    """Put back the cache config of an interrupted cache rollback, atomically.

    borg 1.4.5 rolls back a cache transaction that a crash left open by
    copying the files saved in ``txn.active`` over the cache's own
    (``LocalCache.rollback``, ``shutil.copy``: truncate, then write), and it
    reads the cache config before it does (``LocalCache.open``,
    ``CacheConfig.open``; ``assert_secure`` too). A process killed during
    that copy leaves a truncated config that no later open gets past ("does
    not look like a Borg cache"). When the config is unreadable and the
    transaction's copy is there, the copy goes back through a rename; borg's
    own rollback then restores the rest as usual.
    """
    import configparser

    from borg.cache import cache_dir

    folder = cache_dir(repository)
    saved = os.path.join(folder, "txn.active", "config")
    config = os.path.join(folder, "config")
    if not os.path.isfile(saved):
        return
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(config)
        if parser.has_section("cache"):
            return
    except (configparser.Error, UnicodeDecodeError):
        pass
    logging.getLogger("vbremote.borg.worker").warning("restoring the cache config of an interrupted rollback")
    temporary = config + ".rollback"
    with open(saved, "rb") as source, open(temporary, "wb") as target:
        target.write(source.read())
        target.flush()
        os.fsync(target.fileno())
    os.replace(temporary, config)


def _peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM: since its exec, unlike ru_maxrss,
    which Linux carries over from the parent that forked it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _generator_alive(generator: Any) -> bool:
    return bool(generator.gi_frame is not None)


def _extents(size: int, block_size: int, header_size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of each chunk, as borg's fixed chunker cuts them."""
    offset = 0
    if header_size and size:
        offset = min(header_size, size)
        yield 0, offset
    while offset < size:
        length = min(block_size, size - offset)
        yield offset, length
        offset += length


class _Block:
    __slots__ = ("data", "id", "offset", "size", "zero")

    def __init__(self, offset: int, size: int, id: bytes, data: bytes | None, zero: bool) -> None:
        self.offset, self.size, self.id, self.data, self.zero = offset, size, id, data, zero


# A new block's way to the repository: its encryption, which gives the size
# of the ciphertext and the store of it.
_Sealing = concurrent.futures.Future[tuple[int, concurrent.futures.Future[None]]]


def _ready(sealing: _Sealing | None) -> bool:
    """Whether a block in the store queue can be finished without waiting."""
    if sealing is None:
        return True
    if not sealing.done():
        return False
    if sealing.cancelled() or sealing.exception() is not None:
        return True
    return sealing.result()[1].done()


class _Progress:
    """Progress replies of one write, a few per second rather than one per block.

    Each file gets one at its first block and one at its end; in between, one
    when ``INTERVAL`` seconds have passed since the last. Every block still
    checks for a cancel.
    """

    INTERVAL = 0.1

    def __init__(self, worker: Worker, total: int) -> None:
        self.worker = worker
        self.total = total
        # The last event sent: its file, bytes done and time.
        self.path = ""
        self.done = -1
        self.last = 0.0

    def block(self, path: str, done: int) -> None:
        self.worker.check_cancelled()
        now = time.monotonic()
        if path != self.path or now - self.last >= self.INTERVAL:
            self._send(path, done, now)

    def file_done(self, path: str, done: int) -> None:
        self.worker.check_cancelled()
        if (path, done) != (self.path, self.done):  # a file of one chunk has had its last event
            self._send(path, done, time.monotonic())

    def _send(self, path: str, done: int, now: float) -> None:
        self.path, self.done, self.last = path, done, now
        self.worker.reply(_protocol.PROGRESS, ("write", path, done, self.total))


# borg's compressors and decompressors (borg/compress.pyx, 1.4.5) all write
# into one module-wide output buffer: two of them must never run at once.
_BORG_COMPRESSION = threading.Lock()

# The ids borg puts before compressed data (compress.pyx: CNONE.ID, LZ4.ID).
_STORED_ID = b"\x00\x00"
_LZ4_ID = b"\x01\x00"


class _Compressed:
    """File data compressed already, in borg's format: the key's compressor passes it through."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class _KeyCompressor:
    """The key's compressor (borg's keys compress what they encrypt): data
    compressed already passes through as is; anything else (archive metadata)
    is compressed by borg's compressor, one at a time."""

    def __init__(self, compressor: Any) -> None:
        self.compressor = compressor

    def compress(self, data: Any) -> Any:
        if isinstance(data, _Compressed):
            return data.data
        with _BORG_COMPRESSION:
            return self.compressor.compress(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.compressor, name)


class _Compression:
    """One borg compression spec, for file data: callable from several threads at once.

    lz4 (borg's default, and vbremote's) is done by the lz4 package, which
    releases the GIL and has no shared buffer, so blocks compress in
    parallel. The result is what borg's own LZ4 compressor makes
    (compress.pyx, ``LZ4._decide`` and ``DecidingCompressor.decide_compress``,
    1.4.5): the id 01 00 and the raw LZ4 block when that is smaller than the
    data, else the id 00 00 and the data. ``none`` is stored as borg stores
    it. Any other spec (zstd, lzma, auto, obfuscate) is borg's own
    compressor, one block at a time.
    """

    def __init__(self, compressor: Any) -> None:
        from borg.compress import CNONE, LZ4

        self.compressor = compressor
        self.compress: Callable[[bytes | memoryview], bytes]
        if type(compressor) is LZ4:
            self.compress = self._lz4
        elif type(compressor) is CNONE:
            self.compress = self._stored
        else:
            self.compress = self._borg
        self._zeros: dict[int, bytes] = {}

    def zeros(self, length: int) -> bytes:
        """The compressed data of ``length`` zero bytes (computed once per length)."""
        found = self._zeros.get(length)
        if found is None:
            found = self._zeros[length] = self.compress(ZERO[:length])
        return found

    @staticmethod
    def _lz4(data: bytes | memoryview) -> bytes:
        compressed: bytes = lz4.block.compress(data, store_size=False)
        if len(compressed) < len(data):
            return _LZ4_ID + compressed
        return _STORED_ID + data

    @staticmethod
    def _stored(data: bytes | memoryview) -> bytes:
        return _STORED_ID + data

    def _borg(self, data: bytes | memoryview) -> bytes:
        plain = bytes(data)
        with _BORG_COMPRESSION:
            return bytes(self.compressor.compress(plain))


@contextlib.contextmanager
def _started_early(argv: list[str]) -> Iterator[None]:
    """Have borg's RemoteRepository take the serve command this process started at its
    beginning (``_EARLY_START`` in the parent module) instead of starting it again.

    Used once; a command that is not ``argv`` (never expected) is ended and borg starts its own.
    """
    early = sys.modules.pop("_vbremote_early_serve", None)
    process = getattr(early, "process", None)
    if process is None:
        yield
        return
    if early.command != argv:  # type: ignore[union-attr]
        _end(process)
        yield
        return
    import borg.remote

    original = borg.remote.Popen
    taken = False

    def popen(*args: Any, **kwargs: Any) -> Any:
        nonlocal taken
        taken = True
        return process

    borg.remote.Popen = popen
    try:
        yield
    finally:
        borg.remote.Popen = original
        if not taken:
            _end(process)


def _end(process: Any) -> None:
    """End a serve command nobody uses: close its pipes, kill it, reap it."""
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            _quietly(stream.close)
    _quietly(process.kill)
    _quietly(process.wait)


class _RemoteArgs:
    """The few attributes borg's RemoteRepository reads from its argparse namespace."""

    def __init__(self, upload_ratelimit: int) -> None:
        self.upload_ratelimit = upload_ratelimit
        self.upload_buffer = 0
        self.rsh = None
        self.remote_path = None
        self.debug_topics: list[str] = []


class _InitArgs:
    def __init__(self, encryption: str, location: Any) -> None:
        self.encryption = encryption
        self.location = location


def _borg_location(transport: Any) -> str:
    if transport.serve_command() is None:
        return str(transport.path)
    return "ssh://vbremote-transport" + _borg_url_path(transport.path)


def _load_transport(data: bytes) -> Any:
    """The transport, sent pickled so that a class this process cannot import is a clear refusal."""
    import pickle

    try:
        return pickle.loads(data)
    except (ImportError, AttributeError) as exc:
        raise _Refused(
            "config",
            f"the borg worker cannot import the transport's class ({exc}): transports must be importable"
            " by module path from the worker process (its sys.path is the caller's PYTHONPATH, vbremote's"
            " own folder, the current folder and the installed packages)",
        ) from exc


def _naive_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.astimezone(UTC).replace(tzinfo=None)


def _item(path: str, st: os.stat_result) -> Any:
    from borg.archive import MetadataCollector
    from borg.item import Item

    collector = MetadataCollector(
        noatime=True, noctime=False, nobirthtime=False, numeric_ids=False,
        noflags=True, noacls=True, noxattrs=True,
    )
    item = Item(path=path)
    item.update(collector.stat_simple_attrs(st, path))
    return item


def _drain_stderr(process: Any, partial: bytes, timeout: float = 2.0) -> None:
    """Log what is left on a serve command's stderr, waiting at most ``timeout`` for its end."""
    import select
    import time

    data = partial
    fd = process.stderr.fileno()
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            break
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            continue
        if not chunk:
            break
        data += chunk
    for line in data.decode("utf-8", "replace").splitlines():
        if line.strip():
            logging.getLogger("borg.remote").warning("Remote: %s", line.strip())


def _quietly(call: Callable[[], object]) -> None:
    try:
        call()
    except Exception:
        logging.getLogger("vbremote.borg.worker").debug("cleanup step failed", exc_info=True)


def _set_passphrase(passphrase: str | None, *, new: bool) -> None:
    # This is the worker's own environment, not the caller's.
    if passphrase is not None:
        os.environ["BORG_PASSPHRASE"] = passphrase
        if new:
            os.environ["BORG_NEW_PASSPHRASE"] = passphrase


# --- error classification: the one table from borg's errors to ours ---------


def classify(exc: BaseException, remote_lines: collections.deque[str]) -> tuple[str, str, dict[str, Any]]:
    from borg.archive import Archive
    from borg.cache import Cache
    from borg.crypto.key import (
        KeyfileNotFoundError,
        PassphraseWrong,
        PasswordRetriesExceeded,
        RepoKeyNotFoundError,
    )
    from borg.helpers import Error, IntegrityError
    from borg.locking import LockError, LockErrorT, LockTimeout
    from borg.remote import ConnectionClosed, PathNotAllowed, RemoteRepository
    from borg.repository import Repository

    table: list[tuple[type[BaseException] | tuple[type[BaseException], ...], str]] = [
        (_Refused, ""),
        ((Repository.DoesNotExist, Repository.InvalidRepository), "not_found"),
        ((Repository.AlreadyExists, Repository.PathAlreadyExists), "exists"),
        ((PassphraseWrong, PasswordRetriesExceeded), "passphrase_wrong"),
        ((RepoKeyNotFoundError, KeyfileNotFoundError), "passphrase_missing"),
        ((LockTimeout, LockError, LockErrorT), "locked"),
        (PathNotAllowed, "access_denied"),
        (ConnectionClosed, "connection"),
        ((IntegrityError, Repository.ObjectNotFound), "integrity"),
        (Archive.DoesNotExist, "archive_missing"),
        (Archive.AlreadyExists, "archive_exists"),
        (
            (Cache.RepositoryAccessAborted, Cache.RepositoryReplay, Cache.CacheInitAbortedError),
            "access_denied",
        ),
        (RemoteRepository.RPCError, "borg"),
        (Error, "borg"),
        (OSError, "os"),
    ]
    message = str(exc) or type(exc).__name__
    if isinstance(exc, Error) and hasattr(exc, "get_message"):
        message = exc.get_message()
    if isinstance(exc, RemoteRepository.RPCError):
        message = exc.get_message()
    if isinstance(exc, Cache.RepositoryAccessAborted):
        message += (
            ": the repository was last used by this user at another location"
            " (pass accept_relocated=True if it was moved on purpose)"
        )
    context: dict[str, Any] = {"borg_class": type(exc).__name__}
    for types, kind in table:
        if isinstance(exc, types):
            if isinstance(exc, _Refused):
                kind = exc.kind
                context.update(exc.context)
            elif isinstance(exc, Archive.DoesNotExist | Archive.AlreadyExists) and exc.args:
                context["archive"] = str(exc.args[0])
            if kind == "connection":
                remote = " ".join(remote_lines)
                context["remote"] = remote
                if remote:
                    message = f"{message} The remote said: {remote}"
                if "append-only" in remote or "not allowed" in remote.lower():
                    kind = "access_denied"
            if kind == "integrity":
                context["chunk_id"] = getattr(exc, "chunk_id", None) or _chunk_id_in(message)
            return kind, message, context
    return "internal", f"{type(exc).__name__}: {message}", context


def _chunk_id_in(message: str) -> str | None:
    for word in message.replace(":", " ").split():
        if len(word) == 64 and all(c in "0123456789abcdef" for c in word):
            return word
    return None


def _refuse_prompt(*args: Any, **kwargs: Any) -> str:
    raise _Refused(
        "passphrase_missing",
        "the repository key needs a passphrase: pass passphrase= or set BORG_PASSPHRASE, "
        "BORG_PASSCOMMAND or BORG_PASSPHRASE_FD",
    )


def main() -> None:
    # The protocol owns the original stdin/stdout; anything borg prints goes to stderr.
    requests = Connection(os.dup(0), writable=False)
    replies = Connection(os.dup(1), readable=False)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    sys.stdin = open(os.devnull)  # noqa: SIM115 - lives as long as the process
    sys.stderr = _StderrTap(sys.stderr)
    sys.stdout = sys.stderr
    sys.argv = ["vbremote"]
    # borg's CLI sets this umask so that keys, caches and repositories are private.
    os.umask(0o077)
    # Never ask on a terminal: answer borg's yes/no questions with "no" unless
    # the caller allowed them (the parent puts the allowed answers in our environment).
    for name in ("BORG_RELOCATED_REPO_ACCESS_IS_OK", "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK"):
        os.environ.setdefault(name, "no")

    import borg.logger

    worker = Worker(requests, replies)
    # borg refuses to log before its setup_logging ran; in this process we
    # route its records to the parent instead of configuring handlers twice.
    borg.logger.configured = True
    logging.getLogger("borg").json = False  # type: ignore[attr-defined]
    root = logging.getLogger()
    root.handlers[:] = [worker.handler]
    root.setLevel(logging.INFO)

    from borg.crypto.key import Passphrase

    Passphrase.getpass = classmethod(_refuse_prompt)
    worker.serve()
    # The repository is closed and every reply sent: end here, without the
    # interpreter's teardown (tens of milliseconds of freeing what borg held),
    # which would only delay the caller that waits for this process to end.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
