"""Values that cross vbremote's layers: frozen, typed, free of borg and COM objects."""

from __future__ import annotations

import enum
import json
import math
import uuid as uuid_module
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from attrs import field, frozen

from ._errors import ArchiveMetadataError, ConfigurationError

__all__ = [
    "ArchiveContents",
    "ArchiveFile",
    "ArchiveInfo",
    "CheckResult",
    "ChunkRef",
    "Chunking",
    "CompactResult",
    "DeleteResult",
    "FileChunks",
    "FileRole",
    "FileSpec",
    "ItemKind",
    "MachineState",
    "MediumInfo",
    "Progress",
    "SnapshotMetadata",
    "SnapshotInfo",
    "SnapshotMode",
    "StoredItem",
    "VMInfo",
    "DiskAttachment",
    "WriteResult",
]

#: Version of the metadata record vbremote stores with each archive.
METADATA_FORMAT = 1

#: The block sizes vbremote accepts for disk images (see docs/repositories.md).
BLOCK_SIZES = (1 << 20, 2 << 20, 4 << 20)

#: Archive-relative folder reserved for disks that live outside the VM folder.
EXTERNAL_FOLDER = "_external"

# Bounds of what vbremote accepts in an archive's metadata, written or read
# back (docs/repositories.md, "Untrusted archives"). They are far above what a
# VM needs and low enough that a hostile record cannot exhaust memory.

#: Largest file size recorded for one file: 64 TiB (VirtualBox's VMDK limit; VDI stops at 2 TiB).
MAX_FILE_SIZE = 64 << 40
#: The compression of saved-state files (RAM images), which compress far better with zstd than
#: with lz4 at about lz4's speed; disks keep the repository's (lz4 by default), where zstd
#: would cost write speed for little gain on mostly incompressible blocks.
STATE_COMPRESSION = "zstd,1"
#: Most files one archive may record.
MAX_FILES = 10_000
#: Longest archive path, in UTF-8 bytes, and longest path component.
MAX_PATH_BYTES = 4096
MAX_COMPONENT_BYTES = 255
#: Longest free-form string (VM name, host, versions), in characters.
MAX_STRING = 1024
#: Most labels on one archive; each label is at most 100 characters.
MAX_LABELS = 256
#: Largest ``extra`` mapping, as compact JSON, and its deepest nesting.
MAX_EXTRA_BYTES = 64 * 1024
MAX_EXTRA_DEPTH = 16
#: Largest archive comment vbremote parses (the whole record, as UTF-8).
MAX_COMMENT_BYTES = 16 << 20


def _int_tuple(value: Iterable[int]) -> tuple[int, ...]:
    return tuple(value)


class FileRole(enum.Enum):
    """What a file in a snapshot archive is; the role decides how it is chunked."""

    SETTINGS = "settings"
    DISK = "disk"
    STATE = "state"
    NVRAM = "nvram"
    OTHER = "other"


class SnapshotMode(enum.Enum):
    """How a snapshot was taken (see docs/snapshots.md)."""

    ONLINE = "online"
    OFFLINE = "offline"
    MIGRATE = "migrate"


@frozen
class Chunking:
    """How a file's content was cut into chunks.

    Attributes:
        kind: ``"fixed"`` (block-aligned; disk images) or ``"buzhash"``
            (content-defined: borg's default for small files, smaller
            chunks for saved states).
        params: The chunker parameters as borg records them:
            ``(block_size, header_size)`` for fixed (borg's
            ``--chunker-params fixed,BLOCK,HEADER``: a first chunk of
            ``header_size`` bytes, then blocks), ``(min_exp, max_exp,
            mask_bits, window)`` for buzhash.
    """

    kind: str
    params: tuple[int, ...] = field(converter=_int_tuple)

    def __attrs_post_init__(self) -> None:
        _check_chunking(self.kind, self.params)

    @classmethod
    def fixed(cls, block_size: int, header_size: int = 0) -> Chunking:
        """Fixed-size blocks of ``block_size`` bytes (1, 2 or 4 MiB) after a header chunk.

        Raises:
            ConfigurationError: ``block_size`` is not one of the supported
                sizes, or ``header_size`` is negative or larger than a block.
        """
        return cls("fixed", (block_size, header_size))

    @classmethod
    def buzhash(cls) -> Chunking:
        """borg's default content-defined chunker (``buzhash,19,23,21,4095``)."""
        return cls("buzhash", (19, 23, 21, 4095))

    @classmethod
    def saved_state(cls) -> Chunking:
        """The content-defined chunker of saved states (``buzhash,16,20,18,4095``).

        Chunks of 64 KiB to 1 MiB, about 256 KiB: a RAM image changes in
        small scattered places, runs of zeros become all-zero chunks that are
        neither stored nor fetched, and a restore that is interrupted loses
        at most the 1 MiB chunk in flight.
        """
        return cls("buzhash", (16, 20, 18, 4095))

    @property
    def block_size(self) -> int | None:
        """The block size of a fixed chunking, else ``None``."""
        return self.params[0] if self.kind == "fixed" else None

    @property
    def header_size(self) -> int:
        """The size of the leading header chunk of a fixed chunking (0: none)."""
        return self.params[1] if self.kind == "fixed" else 0

    def borg_params(self) -> str:
        """The same chunking as borg's ``--chunker-params`` value."""
        return ",".join(str(p) for p in (self.kind, *self.params))

    def to_json(self) -> list[Any]:
        """The chunking as stored in the metadata record: ``[kind, *params]``."""
        return [self.kind, *self.params]

    @classmethod
    def from_json(cls, value: Any) -> Chunking:
        """Read a chunking back from a metadata record, checking it as untrusted input.

        Raises:
            ArchiveMetadataError: The record is not a sane chunking.
        """
        if not isinstance(value, list) or not value or not isinstance(value[0], str):
            raise ArchiveMetadataError(f"bad chunking record {_short(value)}")
        try:
            return cls(value[0], tuple(_json_int(v, "chunking parameter") for v in value[1:]))
        except ConfigurationError as exc:
            raise ArchiveMetadataError(f"bad chunking record {_short(value)}: {exc}") from exc


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_int(value: Any, what: str) -> int:
    # JSON has no separate integer type to trust: refuse floats, booleans and strings.
    if type(value) is not int:
        raise ConfigurationError(f"{what} must be an integer, not {_short(value)}")
    return value


def _check_chunking(kind: str, params: tuple[int, ...]) -> None:
    if not all(type(p) is int for p in params):
        raise ConfigurationError(f"chunking parameters must be integers: {_short(params)}")
    if kind == "fixed":
        if len(params) != 2:
            raise ConfigurationError(f"a fixed chunking has a block size and a header size, not {_short(params)}")
        block_size, header_size = params
        if block_size not in BLOCK_SIZES:
            raise ConfigurationError(
                f"block size must be one of {', '.join(str(s >> 20) + ' MiB' for s in BLOCK_SIZES)},"
                f" not {block_size} bytes"
            )
        if not 0 <= header_size <= block_size:
            raise ConfigurationError(f"header size must be between 0 and the block size, not {header_size}")
    elif kind == "buzhash":
        # The limits borg itself puts on --chunker-params buzhash,MIN,MAX,MASK,WINDOW.
        if len(params) != 4:
            raise ConfigurationError(f"a buzhash chunking has four parameters, not {_short(params)}")
        min_exp, max_exp, mask_bits, window = params
        if not 6 <= min_exp <= mask_bits <= max_exp <= 23 or not 0 < window < 1 << 16 or window % 2 == 0:
            raise ConfigurationError(f"buzhash parameters out of range: {params}")
    else:
        raise ConfigurationError(f"chunking kind must be 'fixed' or 'buzhash', not {_short(kind)}")


def _check_archive_path(path: str) -> str:
    if not isinstance(path, str):
        raise ConfigurationError(f"archive path must be a string, not {_short(path)}")
    if not path or path.startswith("/") or "\\" in path or "\0" in path:
        raise ConfigurationError(f"archive path must be relative and POSIX-style: {_short(path)}")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates
        raise ConfigurationError(f"archive path is not valid Unicode: {_short(path)}") from exc
    if len(encoded) > MAX_PATH_BYTES:
        raise ConfigurationError(f"archive path longer than {MAX_PATH_BYTES} bytes: {_short(path)}")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise ConfigurationError(f"archive path must be normalised and stay inside: {_short(path)}")
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise ConfigurationError(f"archive path component longer than {MAX_COMPONENT_BYTES} bytes: {_short(path)}")
    return path


def _medium_uuid(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 64:
        raise ConfigurationError(f"the {what} uuid must be a uuid string, not {_short(value)}")
    try:
        return str(uuid_module.UUID(value))
    except ValueError as exc:
        raise ConfigurationError(f"the {what} uuid must be a uuid, not {_short(value)}") from exc


def _medium_field(value: Any) -> str | None:
    return _medium_uuid(value, "medium")


def _compression_field(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or value != value.strip():
        raise ConfigurationError(f"compression must be a borg compression spec such as 'zstd,1', not {_short(value)}")
    return value


def _parent_field(value: Any) -> str | None:
    return _medium_uuid(value, "parent")


@frozen
class FileSpec:
    """One local file to store in an archive.

    Args:
        source: The local file to read.
        path: Where it goes in the archive, relative to the VM folder
            (POSIX separators, no ``..``).
        role: What the file is; disks are chunked in fixed blocks.
        medium: For a disk image, VirtualBox's medium uuid (recorded in the metadata).
        parent: For a differencing image, its parent medium's uuid.
        compression: The borg compression spec for this file's new chunks
            (``"lz4"``, ``"zstd,1"`` …), or ``None`` for the repository's.
            borg checks it when the archive is written: a spec it does not
            know raises :class:`~vbremote.ConfigurationError` before anything
            is sent. The Snapshotter stores saved states with ``zstd,1``.

    Raises:
        ConfigurationError: A bad path, a medium or parent that is not a uuid,
            or a compression that is not a non-empty string.
    """

    source: Path = field(converter=Path)
    path: str = field(converter=_check_archive_path)
    role: FileRole = FileRole.OTHER
    medium: str | None = field(default=None, kw_only=True, converter=_medium_field)
    parent: str | None = field(default=None, kw_only=True, converter=_parent_field)
    compression: str | None = field(default=None, kw_only=True, converter=_compression_field)


@frozen
class ArchiveFile:
    """A file as recorded in an archive's metadata.

    Attributes:
        path: Archive-relative path.
        role: What the file is.
        size: Size in bytes.
        chunking: How its content was chunked.
        medium: For a disk image, VirtualBox's medium uuid, where recorded.
        parent: For a differencing image, its parent medium's uuid, where recorded.
    """

    path: str = field(validator=lambda _, __, value: _check_archive_path(value))
    role: FileRole = field()
    size: int = field()
    chunking: Chunking = field()
    medium: str | None = field(default=None, kw_only=True, converter=_medium_field)
    parent: str | None = field(default=None, kw_only=True, converter=_parent_field)

    @role.validator
    def _check_role(self, _: Any, value: Any) -> None:
        if not isinstance(value, FileRole):
            raise ConfigurationError(f"role must be a FileRole, not {_short(value)}")

    @size.validator
    def _check_size(self, _: Any, value: Any) -> None:
        if type(value) is not int or not 0 <= value <= MAX_FILE_SIZE:
            raise ConfigurationError(f"file size must be an integer from 0 to {MAX_FILE_SIZE}, not {_short(value)}")

    @chunking.validator
    def _check_chunking(self, _: Any, value: Any) -> None:
        if not isinstance(value, Chunking):
            raise ConfigurationError(f"chunking must be a Chunking, not {_short(value)}")

    def to_json(self) -> dict[str, Any]:
        """The file as stored in the metadata record (``medium`` and ``parent`` only where set)."""
        record: dict[str, Any] = {
            "path": self.path,
            "role": self.role.value,
            "size": self.size,
            "chunking": self.chunking.to_json(),
        }
        for key in ("medium", "parent"):
            if getattr(self, key) is not None:
                record[key] = getattr(self, key)
        return record

    @classmethod
    def from_json(cls, value: Any) -> ArchiveFile:
        """Read a file record back, checking it as untrusted input.

        Raises:
            ArchiveMetadataError: A field is missing, of the wrong type, or out of bounds.
        """
        if not isinstance(value, dict):
            raise ArchiveMetadataError(f"a file record must be an object, not {_short(value)}")
        _expect_keys(value, {"path", "role", "size", "chunking"}, "file record", optional={"medium", "parent"})
        role = value["role"]
        if not isinstance(role, str) or role not in _ROLES:
            raise ArchiveMetadataError(f"unknown file role {_short(role)}")
        try:
            return cls(
                path=value["path"],
                role=FileRole(role),
                size=_json_int(value["size"], "file size"),
                chunking=Chunking.from_json(value["chunking"]),
                medium=value.get("medium"),
                parent=value.get("parent"),
            )
        except ConfigurationError as exc:
            raise ArchiveMetadataError(str(exc)) from exc


_ROLES = frozenset(role.value for role in FileRole)


def _expect_keys(
    record: Mapping[str, Any], keys: set[str], what: str, *, optional: frozenset[str] | set[str] = frozenset()
) -> None:
    present = set(record)
    if not keys <= present or not present <= keys | optional:
        missing = sorted(keys - present)
        unknown = sorted(str(k) for k in present - keys - optional)
        raise ArchiveMetadataError(
            f"{what} must have exactly the keys {sorted(keys)}"
            f"{' (and may have ' + ', '.join(sorted(optional)) + ')' if optional else ''}"
            f"{'; missing ' + ', '.join(missing) if missing else ''}"
            f"{'; unknown ' + _short(', '.join(unknown)) if unknown else ''}"
        )


def _labels(value: Any) -> frozenset[str]:
    if isinstance(value, str):
        raise ConfigurationError("labels must be a collection of strings, not one string")
    labels = frozenset(value)
    if len(labels) > MAX_LABELS:
        raise ConfigurationError(f"at most {MAX_LABELS} labels, not {len(labels)}")
    for label in labels:
        if not isinstance(label, str) or not label or len(label) > 100:
            raise ConfigurationError(f"labels must be non-empty strings of at most 100 characters: {_short(label)}")
    return labels


def _taken(value: Any) -> datetime | None:
    if value is not None and (not isinstance(value, datetime) or value.utcoffset() is None):
        raise ConfigurationError(f"taken must be a timezone-aware datetime, not {_short(value)}")
    return value


def _external(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"external must be a mapping, not {_short(value)}")
    if len(value) > MAX_FILES:
        raise ConfigurationError(f"external maps at most {MAX_FILES} files, not {len(value)}")
    out: dict[str, str] = {}
    for path, original in value.items():
        _check_archive_path(path)
        if path.split("/")[0] != EXTERNAL_FOLDER:
            raise ConfigurationError(f"external paths lie under {EXTERNAL_FOLDER}/, not {_short(path)}")
        if (not isinstance(original, str) or not original.startswith("/") or "\0" in original
                or len(original.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES):
            raise ConfigurationError(f"the original of {_short(path)} must be an absolute path, not {_short(original)}")
        out[path] = original
    return out


def _vm_uuid(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 64:
        raise ConfigurationError(f"the VM uuid must be a uuid string, not {_short(value)}")
    try:
        return str(uuid_module.UUID(value))
    except ValueError as exc:
        raise ConfigurationError(f"the VM uuid must be a uuid, not {_short(value)}") from exc


def _bounded_string(value: Any, what: str, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or len(value) > MAX_STRING or (not optional and not value):
        raise ConfigurationError(f"{what} must be a string of 1 to {MAX_STRING} characters, not {_short(value)}")


def _extra(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"extra must be a mapping, not {_short(value)}")
    _check_json_value(dict(value), 0)
    try:
        text = json.dumps(dict(value), separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"extra must be JSON-serialisable: {exc}") from exc
    if len(text.encode("utf-8", "surrogatepass")) > MAX_EXTRA_BYTES:
        raise ConfigurationError(f"extra must be at most {MAX_EXTRA_BYTES} bytes as JSON")
    # A private copy: what the caller keeps mutating is not what is stored.
    copy: dict[str, Any] = json.loads(text)
    return copy


def _check_json_value(value: Any, depth: int) -> None:
    if depth > MAX_EXTRA_DEPTH:
        raise ConfigurationError(f"extra nests deeper than {MAX_EXTRA_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigurationError(f"extra keys must be strings, not {_short(key)}")
            _check_json_value(item, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_json_value(item, depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigurationError("extra must not hold NaN or infinities")
    elif value is not None and not isinstance(value, str | int | float | bool):
        raise ConfigurationError(f"extra must hold JSON values only, not {type(value).__name__}")


@frozen
class SnapshotMetadata:
    """What vbremote records about a snapshot, besides the files.

    Args:
        vm_name: The VM's name when the snapshot was taken.
        vm_uuid: The VM's uuid; selection by VM uses this, so renamed VMs keep their history.
        mode: How the snapshot was taken.
        vbox_version: VirtualBox's version string, where known.
        host: The host name the snapshot was taken on.
        cpu_vendor: The host CPU vendor, where known.
        cpu_portability: The VM's CPU portability level, where known.
        labels: Free-form labels (retention policies can keep by label).
        extra: Further JSON-serialisable facts; keys are free. A copy is kept;
            it takes part in equality but not in the hash.
        taken: The snapshot's instant (timezone-aware), where recorded.
        external: Files that lived outside the VM folder: their archive path
            (under ``_external/``) to their original absolute path. A copy is
            kept; it takes part in equality but not in the hash.

    Values are hashable. Strings are at most :data:`MAX_STRING` characters.

    Raises:
        ConfigurationError: A value is of the wrong type or out of bounds
            (``vm_uuid`` must parse as a uuid; it is kept in canonical
            lower-case form).
    """

    vm_name: str = field(validator=lambda _, __, v: _bounded_string(v, "the VM name", optional=False))
    vm_uuid: str = field(converter=_vm_uuid)
    mode: SnapshotMode = field(default=SnapshotMode.OFFLINE)
    vbox_version: str | None = field(
        default=None, validator=lambda _, __, v: _bounded_string(v, "vbox_version", optional=True)
    )
    host: str | None = field(default=None, validator=lambda _, __, v: _bounded_string(v, "host", optional=True))
    cpu_vendor: str | None = field(
        default=None, validator=lambda _, __, v: _bounded_string(v, "cpu_vendor", optional=True)
    )
    cpu_portability: int | None = field(default=None)
    labels: frozenset[str] = field(default=frozenset(), converter=_labels)
    # A dict cannot be hashed: equal records have equal hashes without it.
    extra: Mapping[str, Any] = field(factory=dict, converter=_extra, hash=False)
    taken: datetime | None = field(default=None, converter=_taken)
    external: Mapping[str, str] = field(factory=dict, converter=_external, hash=False)

    @mode.validator
    def _check_mode(self, _: Any, value: Any) -> None:
        if not isinstance(value, SnapshotMode):
            raise ConfigurationError(f"mode must be a SnapshotMode, not {_short(value)}")

    @cpu_portability.validator
    def _check_portability(self, _: Any, value: Any) -> None:
        if value is not None and (type(value) is not int or not 0 <= value <= 255):
            raise ConfigurationError(f"cpu_portability must be an integer from 0 to 255, not {_short(value)}")

    def to_json(self) -> dict[str, Any]:
        """The metadata as stored in the archive comment (without the file list)."""
        return {
            "vm": {"name": self.vm_name, "uuid": self.vm_uuid},
            "mode": self.mode.value,
            "vbox_version": self.vbox_version,
            "host": self.host,
            "cpu_vendor": self.cpu_vendor,
            "cpu_portability": self.cpu_portability,
            "labels": sorted(self.labels),
            "extra": dict(self.extra),
            **({"taken": self.taken.isoformat()} if self.taken is not None else {}),
            **({"external": dict(self.external)} if self.external else {}),
        }

    @classmethod
    def from_json(cls, value: Any) -> SnapshotMetadata:
        """Read the metadata back from a record, checking it as untrusted input.

        Raises:
            ArchiveMetadataError: A field is missing, of the wrong type, or out of bounds.
        """
        if not isinstance(value, dict):
            raise ArchiveMetadataError(f"the metadata record must be an object, not {_short(value)}")
        vm = value.get("vm")
        if not isinstance(vm, dict):
            raise ArchiveMetadataError(f"the record's vm must be an object, not {_short(vm)}")
        _expect_keys(vm, {"name", "uuid"}, "the record's vm")
        mode = value.get("mode")
        if not isinstance(mode, str) or mode not in _MODES:
            raise ArchiveMetadataError(f"unknown snapshot mode {_short(mode)}")
        labels = value.get("labels", [])
        if not isinstance(labels, list):
            raise ArchiveMetadataError(f"labels must be a list, not {_short(labels)}")
        taken = value.get("taken")
        if taken is not None:
            if not isinstance(taken, str) or len(taken) > 64:
                raise ArchiveMetadataError(f"taken must be an ISO 8601 time, not {_short(taken)}")
            try:
                taken = datetime.fromisoformat(taken)
            except ValueError as exc:
                raise ArchiveMetadataError(f"taken must be an ISO 8601 time, not {_short(taken)}") from exc
        try:
            return cls(
                vm_name=vm["name"],
                vm_uuid=vm["uuid"],
                mode=SnapshotMode(mode),
                vbox_version=value.get("vbox_version"),
                host=value.get("host"),
                cpu_vendor=value.get("cpu_vendor"),
                cpu_portability=value.get("cpu_portability"),
                labels=frozenset(labels) if all(isinstance(x, str) for x in labels) else labels,
                extra=value.get("extra", {}),
                taken=taken,
                external=value.get("external", {}),
            )
        except ConfigurationError as exc:
            raise ArchiveMetadataError(str(exc)) from exc
        except TypeError as exc:  # unhashable labels
            raise ArchiveMetadataError(f"labels must be strings: {_short(labels)}") from exc


_MODES = frozenset(mode.value for mode in SnapshotMode)
_RECORD_KEYS = frozenset(
    {"vbremote", "vm", "mode", "vbox_version", "host", "cpu_vendor", "cpu_portability", "labels", "extra", "files",
     "taken", "external"}
)


def encode_comment(metadata: SnapshotMetadata, files: list[ArchiveFile]) -> str:
    """The archive comment that carries vbremote's metadata (compact JSON).

    Raises:
        ConfigurationError: Too many files, two files at one path, or a file
            path that is also another file's folder.
    """
    try:
        _check_file_set(files)
    except ArchiveMetadataError as exc:
        raise ConfigurationError(str(exc)) from None
    record = {"vbremote": METADATA_FORMAT, **metadata.to_json(), "files": [f.to_json() for f in files]}
    return json.dumps(record, separators=(",", ":"), sort_keys=True)


def _check_file_set(files: list[ArchiveFile] | tuple[ArchiveFile, ...]) -> None:
    if len(files) > MAX_FILES:
        raise ArchiveMetadataError(f"an archive records at most {MAX_FILES} files, not {len(files)}")
    paths: set[str] = set()
    for f in files:
        if f.path in paths:
            raise ArchiveMetadataError(f"two files at archive path {_short(f.path)}")
        paths.add(f.path)
    for path in paths:
        parts = path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in paths:
                raise ArchiveMetadataError(f"archive path {_short(path)} lies under another file")


def decode_comment(
    comment: str, *, archive: str = "", location: str = ""
) -> tuple[SnapshotMetadata, tuple[ArchiveFile, ...]] | None:
    """Parse an archive comment, checking it as untrusted input.

    A comment that is not a vbremote record (not a JSON object with a
    ``"vbremote"`` key) belongs to another tool and decodes to ``None``. A
    comment that claims to be vbremote's is checked in full: every field's
    type and bounds, every path relative and normalised, no duplicates.

    Args:
        comment: The archive's comment, as the repository returned it.
        archive: The archive's name, for the error.
        location: The repository's location, for the error.

    Returns:
        The metadata and the files, or ``None`` for another tool's comment.

    Raises:
        ArchiveMetadataError: The record claims to be vbremote's and is
            malformed, hostile, or of an unknown format version.
    """
    if not isinstance(comment, str):
        raise ArchiveMetadataError(f"archive {archive!r}: the comment is not text", archive=archive, location=location)
    if not comment.startswith("{"):
        return None
    if len(comment) > MAX_COMMENT_BYTES:
        # Too large to be ours: parse no further than to see whether it claims to be.
        if '"vbremote"' in comment[:4096]:
            raise ArchiveMetadataError(
                f"archive {archive!r}: metadata record larger than {MAX_COMMENT_BYTES} bytes",
                archive=archive, location=location,
            )
        return None
    try:
        record = json.loads(comment, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        if '"vbremote"' in comment:  # damaged or built to break the parser
            reason = "nests too deep" if isinstance(exc, RecursionError) else "is not valid JSON"
            raise ArchiveMetadataError(
                f"archive {archive!r} has invalid vbremote metadata: the record {reason}",
                archive=archive, location=location,
            ) from None
        return None  # not JSON: another tool's comment
    if not isinstance(record, dict) or "vbremote" not in record:
        return None
    try:
        if record["vbremote"] != METADATA_FORMAT or type(record["vbremote"]) is not int:
            raise ArchiveMetadataError(
                f"unknown metadata format {_short(record['vbremote'])} (this vbremote reads {METADATA_FORMAT})"
            )
        unknown = set(record) - _RECORD_KEYS
        if unknown:
            raise ArchiveMetadataError(f"unknown keys in the record: {_short(sorted(str(k) for k in unknown))}")
        raw_files = record.get("files")
        if not isinstance(raw_files, list):
            raise ArchiveMetadataError(f"the record's files must be a list, not {_short(raw_files)}")
        if len(raw_files) > MAX_FILES:
            raise ArchiveMetadataError(f"an archive records at most {MAX_FILES} files, not {len(raw_files)}")
        files = tuple(ArchiveFile.from_json(f) for f in raw_files)
        _check_file_set(files)
        return SnapshotMetadata.from_json(record), files
    except ArchiveMetadataError as exc:
        raise ArchiveMetadataError(
            f"archive {archive!r} has invalid vbremote metadata: {exc}", archive=archive, location=location
        ) from exc


class _NotJSON:
    """Stands for NaN or Infinity in a record: strict JSON has neither, and every check refuses it."""

    def __repr__(self) -> str:
        return "<NaN or Infinity>"


def _refuse_constant(name: str) -> Any:
    return _NotJSON()


@frozen
class ArchiveInfo:
    """An archive written by vbremote, with its metadata.

    Attributes:
        name: The archive name (for display; the metadata is the source of truth).
        id: The archive id, hex.
        time: When the snapshot was taken (timezone-aware, UTC).
        metadata: What vbremote recorded.
        files: The files stored, with their roles and chunking.
    """

    name: str
    id: str
    time: datetime
    metadata: SnapshotMetadata
    files: tuple[ArchiveFile, ...]

    @property
    def vm_name(self) -> str:
        """The VM's name when the snapshot was taken."""
        return self.metadata.vm_name

    @property
    def vm_uuid(self) -> str:
        """The VM's uuid."""
        return self.metadata.vm_uuid

    @property
    def mode(self) -> SnapshotMode:
        """How the snapshot was taken."""
        return self.metadata.mode

    def file(self, path: str) -> ArchiveFile:
        """The file recorded at ``path``.

        Raises:
            KeyError: No file at that path.
        """
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)


@frozen
class ChunkRef:
    """One chunk of a stored file.

    Attributes:
        id: The chunk id (the repository key's id hash of the plaintext).
        offset: Where the chunk starts in the file.
        size: Its plaintext size.
    """

    id: bytes
    offset: int
    size: int


@frozen
class FileChunks:
    """A stored file's chunk list, in file order."""

    archive: str
    path: str
    size: int
    chunks: tuple[ChunkRef, ...]


class ItemKind(enum.Enum):
    """What an archive item is, from its stored mode."""

    FILE = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"
    BLOCK_DEVICE = "block_device"
    CHAR_DEVICE = "char_device"
    FIFO = "fifo"


@frozen
class StoredItem:
    """One item of an archive, as the archive describes it (validated).

    Attributes:
        path: The archive-relative path (relative, normalised, without ``..``).
        kind: What the item is.
        mode: The stored mode bits (type and permissions).
        chunks: The content of a regular file stored in this item; ``None``
            for other kinds and for a hard link whose content is another item's.
        link_target: A symlink's target, or for a hard link the path of the
            item that holds the content; ``None`` otherwise.
        hardlinked: The file had more than one name when it was archived (borg
            marks such files even when only one name is in the archive).
    """

    path: str
    kind: ItemKind
    mode: int
    chunks: FileChunks | None = None
    link_target: str | None = None
    hardlinked: bool = False

    @property
    def is_plain_file(self) -> bool:
        """A regular file with its content here and no other name: what a restore can take as is."""
        return self.kind is ItemKind.FILE and self.chunks is not None and not self.hardlinked


@frozen
class ArchiveContents:
    """Every item of one archive, with the chunk lists of its regular files, in archive order.

    Attributes:
        archive: The archive name.
        items: Every item, regular files or not.
    """

    archive: str
    items: tuple[StoredItem, ...]

    def files(self) -> dict[str, FileChunks]:
        """The chunk list of every regular file whose content is stored in its item, by path.

        Hard-linked files are included where their content is (check
        :attr:`StoredItem.hardlinked` to refuse them); the other names of a
        hard link are not (see :meth:`others`).
        """
        return {item.path: item.chunks for item in self.items if item.chunks is not None}

    def others(self) -> tuple[StoredItem, ...]:
        """The items that are not plain regular files: directories, symlinks, devices, FIFOs, hard links."""
        return tuple(item for item in self.items if not item.is_plain_file)

    def file(self, path: str) -> FileChunks:
        """The chunk list of the regular file at ``path``.

        Raises:
            KeyError: No regular file with stored content at that path.
        """
        for item in self.items:
            if item.path == path and item.chunks is not None:
                return item.chunks
        raise KeyError(path)


@frozen
class Progress:
    """A progress event of a long operation.

    Attributes:
        operation: ``"write"``, ``"hash"``, ``"fetch"`` …
        path: The file being worked on, where there is one.
        done: Bytes done so far in this operation.
        total: Bytes the operation will handle in all (0 when unknown).
    """

    operation: str
    path: str
    done: int
    total: int


@frozen
class WriteResult:
    """What writing an archive did.

    Attributes:
        archive: The archive written.
        bytes_read: Bytes read from the local files.
        bytes_new: Plaintext bytes of chunks the repository did not have.
        bytes_stored: Bytes those new chunks took after compression and encryption.
        chunks: Chunks in the archive's files.
        chunks_new: Chunks that were sent to the repository.
        chunks_zero: All-zero chunks (neither hashed nor compressed).
        seconds: Wall time of the write.
        checkpoints: Checkpoint archives the write committed on its way (all
            gone now that the archive is committed).
        checkpoints_removed: Checkpoint archives of earlier, unfinished writes
            of the same VM that this write's commit deleted.
    """

    archive: ArchiveInfo
    bytes_read: int
    bytes_new: int
    bytes_stored: int
    chunks: int
    chunks_new: int
    chunks_zero: int
    seconds: float
    checkpoints: int = 0
    checkpoints_removed: tuple[str, ...] = ()


@frozen
class DeleteResult:
    """What deleting archives did.

    Attributes:
        deleted: Names of the archives removed from the repository's manifest.
        append_only: ``True`` when the repository is known to be append-only
            (deletes there free no space: the server keeps the data and can
            roll the delete back), ``False`` when known not to be, ``None``
            when the transport cannot tell.
    """

    deleted: tuple[str, ...]
    append_only: bool | None


@frozen
class CompactResult:
    """What compaction did.

    Attributes:
        freed_bytes: Bytes the repository folder shrank by, where it can be
            measured (local transports); ``None`` otherwise.
        append_only: As in :class:`DeleteResult`; an append-only repository is never compacted.
    """

    freed_bytes: int | None
    append_only: bool | None


@frozen
class CheckResult:
    """The outcome of a repository check.

    Attributes:
        ok: No problem was found.
        problems: What borg reported, one message a problem.
    """

    ok: bool
    problems: tuple[str, ...]


class MachineState(enum.Enum):
    """A VM's state, by VirtualBox's name for it (``MachineState_<name>``).

    The adapter maps VirtualBox's numbers through the connected manager's
    constants, which differ between 6.1 and 7.x; ``UNKNOWN`` is a value this
    version of vbremote does not know.
    """

    NULL = "Null"
    POWERED_OFF = "PoweredOff"
    SAVED = "Saved"
    TELEPORTED = "Teleported"
    ABORTED = "Aborted"
    ABORTED_SAVED = "AbortedSaved"
    RUNNING = "Running"
    PAUSED = "Paused"
    STUCK = "Stuck"
    TELEPORTING = "Teleporting"
    LIVE_SNAPSHOTTING = "LiveSnapshotting"
    STARTING = "Starting"
    STOPPING = "Stopping"
    SAVING = "Saving"
    RESTORING = "Restoring"
    TELEPORTING_PAUSED_VM = "TeleportingPausedVM"
    TELEPORTING_IN = "TeleportingIn"
    DELETING_SNAPSHOT_ONLINE = "DeletingSnapshotOnline"
    DELETING_SNAPSHOT_PAUSED = "DeletingSnapshotPaused"
    ONLINE_SNAPSHOTTING = "OnlineSnapshotting"
    RESTORING_SNAPSHOT = "RestoringSnapshot"
    DELETING_SNAPSHOT = "DeletingSnapshot"
    SETTING_UP = "SettingUp"
    SNAPSHOTTING = "Snapshotting"
    UNKNOWN = "Unknown"

    @property
    def is_running(self) -> bool:
        """Running or Paused: a guest is there (an online snapshot is possible)."""
        return self in (MachineState.RUNNING, MachineState.PAUSED)

    @property
    def is_off(self) -> bool:
        """No VM process: powered off, saved, aborted or teleported."""
        return self in (
            MachineState.POWERED_OFF,
            MachineState.SAVED,
            MachineState.TELEPORTED,
            MachineState.ABORTED,
            MachineState.ABORTED_SAVED,
        )

    @property
    def is_saved(self) -> bool:
        """A saved-state file holds the guest's RAM (Saved, AbortedSaved)."""
        return self in (MachineState.SAVED, MachineState.ABORTED_SAVED)


@frozen
class MediumInfo:
    """A disk image, as VirtualBox registers it.

    Attributes:
        uuid: The medium's uuid.
        location: Its file's absolute path.
        format: ``VDI``, ``VMDK`` …
        logical_size: The guest-visible size in bytes (0 when the medium is
            inaccessible: VirtualBox learns the size by opening the file).
        parent: The parent's uuid (a differencing image), or ``None`` (a base).
        accessible: Whether VirtualBox could open the medium's file. A VM
            registered while a medium's file is missing loads it as
            ``Inaccessible`` (registering does not check the files).
        access_error: VirtualBox's reason when the medium is inaccessible, else ``""``.
    """

    uuid: str
    location: Path
    format: str
    logical_size: int
    parent: str | None
    accessible: bool = True
    access_error: str = ""


@frozen
class DiskAttachment:
    """A drive attached to a storage controller, with its medium's whole chain.

    Attributes:
        controller: The controller's name.
        port: The port.
        device: The device on the port.
        type: ``"HardDisk"``, ``"DVD"`` or ``"Floppy"``.
        chain: The attached medium and its parents, base first (empty for an empty drive).
    """

    controller: str
    port: int
    device: int
    type: str
    chain: tuple[MediumInfo, ...]

    @property
    def medium(self) -> MediumInfo | None:
        """The attached medium (the chain's last), or ``None``."""
        return self.chain[-1] if self.chain else None

    @property
    def base(self) -> MediumInfo | None:
        """The chain's base medium, or ``None``."""
        return self.chain[0] if self.chain else None


@frozen
class SnapshotInfo:
    """A VirtualBox snapshot in a VM's snapshot tree.

    Attributes:
        uuid: The snapshot's uuid.
        name: Its name.
        description: Its description.
        taken: When it was taken (UTC).
        online: Whether it holds a saved state: VirtualBox's ``ISnapshot.online``
            is true when the snapshot has a state file, so an offline snapshot
            of a Saved VM (which shares the VM's state file) is online too.
        state_file: Its saved-state file, or ``None``.
        nvram_file: Its copy of the VM's NVRAM store (UEFI variables, the
            emulated TPM's state), ``Snapshots/<time>.nvram``, or ``None``
            when the VM had no NVRAM file when the snapshot was taken.
        attachments: The drives of the machine at the snapshot, with their frozen media.
        parent: The parent snapshot's uuid, or ``None``.
        children: The snapshots taken on top of it.
    """

    uuid: str
    name: str
    description: str
    taken: datetime
    online: bool
    state_file: Path | None
    nvram_file: Path | None
    attachments: tuple[DiskAttachment, ...]
    parent: str | None
    children: tuple[SnapshotInfo, ...]

    def walk(self) -> tuple[SnapshotInfo, ...]:
        """This snapshot and every one below it, depth first."""
        out = [self]
        for child in self.children:
            out.extend(child.walk())
        return tuple(out)


@frozen
class VMInfo:
    """What vbremote knows about a registered VM, read in one go.

    Attributes:
        uuid: The VM's uuid.
        name: Its name.
        state: Its state.
        settings_file: The ``.vbox`` file.
        snapshot_folder: Where VirtualBox puts differencing images and saved states.
        state_file: The saved-state file (Saved VMs), or ``None``.
        last_state_change: When the VM's state last changed (UTC); after a
            snapshot is restored, the snapshot's time.
        nvram_file: The NVRAM file VirtualBox names for the VM, or ``None``.
        cpu_portability_level: The CPUID portability level (0: all host features).
        attachments: The drives of the current state.
        snapshot_tree: The root of the snapshot tree, or ``None``.
        current_snapshot: The current snapshot's uuid, or ``None``.
        locked: Whether a session holds (or is releasing) the VM's lock.
        firmware: The firmware type: ``"BIOS"``, ``"EFI"``, ``"EFI32"``,
            ``"EFI64"`` or ``"EFIDUAL"``.
    """

    uuid: str
    name: str
    state: MachineState
    settings_file: Path
    snapshot_folder: Path
    state_file: Path | None
    last_state_change: datetime
    nvram_file: Path | None
    cpu_portability_level: int
    attachments: tuple[DiskAttachment, ...]
    snapshot_tree: SnapshotInfo | None
    current_snapshot: str | None
    locked: bool
    firmware: str = "BIOS"

    @property
    def folder(self) -> Path:
        """The VM folder (the settings file's folder)."""
        return self.settings_file.parent

    @property
    def disks(self) -> tuple[DiskAttachment, ...]:
        """The hard disks of the current state."""
        return tuple(a for a in self.attachments if a.type == "HardDisk")

    @property
    def inaccessible_media(self) -> tuple[MediumInfo, ...]:
        """The media of the current state that VirtualBox cannot open (each once, in attachment order)."""
        seen: dict[str, MediumInfo] = {}
        for attachment in self.attachments:
            for medium in attachment.chain:
                if not medium.accessible:
                    seen.setdefault(medium.uuid, medium)
        return tuple(seen.values())

    def snapshots(self) -> tuple[SnapshotInfo, ...]:
        """Every snapshot, depth first."""
        return self.snapshot_tree.walk() if self.snapshot_tree else ()

    def snapshot(self, name_or_uuid: str) -> SnapshotInfo:
        """The snapshot with this uuid, or else the first with this name.

        Raises:
            KeyError: None has it.
        """
        everything = self.snapshots()
        for snapshot in everything:
            if snapshot.uuid == name_or_uuid.strip("{}").lower():
                return snapshot
        for snapshot in everything:
            if snapshot.name == name_or_uuid:
                return snapshot
        raise KeyError(name_or_uuid)
