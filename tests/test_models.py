"""Values: validation and the metadata record stored with each archive."""

from __future__ import annotations

import json
import pickle
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import vbremote
from vbremote._models import MAX_FILE_SIZE, MAX_FILES, ArchiveFile, decode_comment, encode_comment

json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20)
metadata_strategy = st.builds(
    vbremote.SnapshotMetadata,
    vm_name=st.text(min_size=1, max_size=40),
    vm_uuid=st.uuids().map(str),
    mode=st.sampled_from(vbremote.SnapshotMode),
    vbox_version=st.none() | st.text(max_size=20),
    host=st.none() | st.text(max_size=20),
    cpu_vendor=st.none() | st.text(max_size=20),
    cpu_portability=st.none() | st.integers(0, 3),
    labels=st.frozensets(st.text(min_size=1, max_size=20), max_size=4),
    extra=st.dictionaries(st.text(max_size=10), json_scalars, max_size=4),
    # Fixed offsets: zones with folds compare unequal across zones at ambiguous times.
    taken=st.none() | st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=2)),
                                                                timezone(-timedelta(hours=5, minutes=30))])),
    external=st.dictionaries(
        st.from_regex(r"_external/([0-9]/)?[a-z][a-z0-9.-]{0,7}", fullmatch=True),
        st.from_regex(r"(/[a-zA-Z0-9 ._-]{1,8}){1,4}", fullmatch=True),
        max_size=3,
    ),
)
chunkings = st.one_of(
    st.builds(vbremote.Chunking.fixed, st.sampled_from([1 << 20, 2 << 20, 4 << 20]), st.integers(0, 1 << 20)),
    st.just(vbremote.Chunking.buzhash()),
)
# Files live at the top (lower-case names) or in folders (upper-case names),
# so no file path is ever another file's folder.
files_strategy = st.lists(
    st.builds(
        ArchiveFile,
        path=st.from_regex(r"[a-z][a-z0-9.]{0,7}|[A-Z]{1,8}(/[A-Z]{1,3}){0,1}/[a-z][a-z0-9.{}-]{0,7}", fullmatch=True),
        role=st.sampled_from(vbremote.FileRole),
        size=st.integers(0, MAX_FILE_SIZE),
        chunking=chunkings,
        medium=st.none() | st.uuids().map(str),
        parent=st.none() | st.uuids().map(str),
    ),
    max_size=5,
    unique_by=lambda f: f.path,
)
json_values = st.recursive(
    json_scalars | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
UUID = "0b8e1c6a-0000-4000-8000-000000000001"
RECORD_KEYS = {"vm", "mode", "vbox_version", "host", "cpu_vendor", "cpu_portability", "labels", "extra", "files",
               "taken", "external"}
# Values near the valid ones, so that generated records get past the first checks.
plausible = (
    json_values
    | st.sampled_from(["online", "disk", "vm.vdi", "../x", "/abs", "a//b", UUID, "fixed", "buzhash"])
    | st.lists(st.sampled_from(["fixed", "buzhash", 1 << 20, 0, 19, 23, 21, 4095, -1]), max_size=5)
    | st.fixed_dictionaries({"name": st.text(max_size=5), "uuid": st.sampled_from([UUID, "x"])})
    | st.lists(st.dictionaries(st.sampled_from(["path", "role", "size", "chunking"]), json_values), max_size=2)
)


def good_record() -> dict[str, Any]:
    return json.loads(
        encode_comment(
            vbremote.SnapshotMetadata("vm", UUID, labels={"daily"}, extra={"k": [1, 2]},
                                      taken=datetime(2026, 5, 1, 10, tzinfo=UTC),
                                      external={"_external/data.vdi": "/srv/data.vdi"}),
            [
                ArchiveFile("vm.vbox", vbremote.FileRole.SETTINGS, 100, vbremote.Chunking.buzhash()),
                ArchiveFile("vm.vdi", vbremote.FileRole.DISK, 1 << 30, vbremote.Chunking.fixed(1 << 20, 512),
                            medium=UUID, parent=None),
            ],
        )
    )


def decodes_or_refuses(comment: str) -> None:
    """The only outcomes for any comment: another tool's (None), a valid record, or ArchiveMetadataError."""
    refused: vbremote.ArchiveMetadataError | None = None
    try:
        decoded = decode_comment(comment, archive="arch-1", location="loc")
    except vbremote.ArchiveMetadataError as exc:
        refused = exc
        decoded = None
    if refused is not None:
        assert (refused.archive, refused.location) == ("arch-1", "loc")
        assert "'arch-1'" in str(refused)
    elif decoded is not None:
        metadata, files = decoded
        # Whatever passed is re-encodable and reads back the same.
        assert decode_comment(encode_comment(metadata, list(files))) == decoded


class TestMetadataRecord:
    @given(metadata_strategy, files_strategy)
    def test_roundtrip(self, metadata, files):
        """Any metadata and file list survive the archive comment unchanged."""
        decoded = decode_comment(encode_comment(metadata, files))
        assert decoded == (metadata, tuple(files))

    @pytest.mark.parametrize(
        "comment",
        ["", "hello", "{", "[]", '{"other": 1}', '{"other": ' + "[" * 100_000 + "]" * 100_000 + "}"],
        ids=["empty", "text", "brace", "list", "other-tool", "nested-too-deep"],
    )
    def test_foreign_comments(self, comment):
        """Comments that are not vbremote's record decode to None instead of failing."""
        assert decode_comment(comment) is None

    def test_record_is_plain_json(self):
        """The record is compact JSON with a format version, readable without vbremote."""
        record = json.loads(encode_comment(vbremote.SnapshotMetadata("vm", UUID), []))
        assert record["vbremote"] == 1
        assert record["vm"] == {"name": "vm", "uuid": UUID}

    @given(st.text(max_size=200))
    def test_any_text_decodes_or_is_refused(self, comment):
        """Arbitrary text is another tool's comment, a valid record, or a typed refusal; nothing else escapes."""
        decodes_or_refuses(comment)

    @given(json_values)
    def test_any_json_decodes_or_is_refused(self, value):
        """Arbitrary JSON, also claiming to be a vbremote record, never escapes as anything but the typed error."""
        decodes_or_refuses(json.dumps(value))
        if isinstance(value, dict):
            decodes_or_refuses(json.dumps({**value, "vbremote": 1}))

    @given(
        st.dictionaries(st.sampled_from(sorted(RECORD_KEYS)), plausible, max_size=len(RECORD_KEYS)),
        st.lists(
            st.dictionaries(st.sampled_from(["path", "role", "size", "chunking", "medium", "parent", "x"]), plausible)
            | json_values,
            max_size=3,
        ),
    )
    def test_record_shaped_json_decodes_or_is_refused(self, record, files):
        """Records with vbremote's keys and plausible or hostile values are valid or refused, never a crash."""
        decodes_or_refuses(json.dumps({**record, "vbremote": 1, "files": files}))
        decodes_or_refuses(json.dumps({**good_record(), **record}))

    @given(st.data())
    def test_damaged_record_decodes_or_is_refused(self, data):
        """A valid record with any one value replaced by arbitrary JSON is valid or refused, never a crash."""
        record = good_record()
        parent: Any = record
        while True:
            keys = list(parent) if isinstance(parent, dict) else list(range(len(parent)))
            if not keys:
                break
            key = data.draw(st.sampled_from(keys))
            if isinstance(parent[key], dict | list) and data.draw(st.booleans()):
                parent = parent[key]
                continue
            parent[key] = data.draw(json_values)
            break
        decodes_or_refuses(json.dumps(record))


def hostile(change: Any) -> str:
    record = good_record()
    change(record)
    return json.dumps(record)


def set_file(index: int, key: str, value: Any) -> Any:
    return lambda record: record["files"][index].__setitem__(key, value)


class TestHostileRecords:
    @pytest.mark.parametrize(
        ("change", "words"),
        [
            (set_file(1, "path", "../../../etc/cron.d/x"), "stay inside"),
            (set_file(1, "path", "/etc/passwd"), "relative"),
            (set_file(1, "path", "a/./b"), "normalised"),
            (set_file(1, "path", "a//b"), "normalised"),
            (set_file(1, "path", "a/"), "normalised"),
            (set_file(1, "path", "a\\b"), "POSIX"),
            (set_file(1, "path", "a\u0000b"), "POSIX"),
            (set_file(1, "path", "x" * 300), "component"),
            (set_file(1, "path", "a/" * 2100 + "b"), "4096 bytes"),
            (set_file(1, "path", 7), "string"),
            (set_file(1, "path", "vm.vbox"), "two files"),
            (set_file(1, "path", "vm.vbox/inside"), "under another file"),
            (set_file(1, "role", "rootkit"), "unknown file role"),
            (set_file(1, "size", -1), "file size"),
            (set_file(1, "size", MAX_FILE_SIZE + 1), "file size"),
            (set_file(1, "size", 1.5), "integer"),
            (set_file(1, "size", True), "integer"),
            (set_file(1, "size", "12"), "integer"),
            (set_file(1, "chunking", ["fixed", 1048576]), "block size and a header size"),
            (set_file(1, "chunking", ["fixed", 512, 0]), "block size"),
            (set_file(1, "chunking", ["fixed", 1048576, 1048577]), "header size"),
            (set_file(1, "chunking", ["buzhash", 19, 23, 21, 4096]), "buzhash"),
            (set_file(1, "chunking", ["buzhash", 0, 64, 21, 4095]), "buzhash"),
            (set_file(1, "chunking", ["rabin", 1]), "kind"),
            (set_file(1, "chunking", []), "chunking"),
            (set_file(1, "extra_key", 1), "unknown"),
            (set_file(1, "medium", "not-a-uuid"), "medium uuid"),
            (set_file(1, "parent", 7), "parent uuid"),
            (lambda r: r.__setitem__("taken", "yesterday"), "ISO 8601"),
            (lambda r: r.__setitem__("taken", 1700000000), "ISO 8601"),
            (lambda r: r.__setitem__("taken", "2026-05-01T10:00:00"), "timezone-aware"),
            (lambda r: r.__setitem__("external", {"dev.vdi": "/data/dev.vdi"}), "lie under _external/"),
            (lambda r: r.__setitem__("external", {"_external/../../x": "/data/x"}), "normalised"),
            (lambda r: r.__setitem__("external", {"_external/x": "data/x"}), "absolute path"),
            (lambda r: r.__setitem__("external", {"_external/x": ["/data/x"]}), "absolute path"),
            (lambda r: r.__setitem__("external", ["_external/x"]), "mapping"),
            (lambda r: r["files"][1].pop("size"), "missing size"),
            (lambda r: r.__setitem__("files", {"a": 1}), "list"),
            (lambda r: r.__setitem__("files", [r["files"][0]] * (MAX_FILES + 1)), "at most"),
            (lambda r: r.__setitem__("vbremote", 2), "unknown metadata format"),
            (lambda r: r.__setitem__("vbremote", True), "unknown metadata format"),
            (lambda r: r.__setitem__("rootkit", 1), "unknown keys"),
            (lambda r: r.__setitem__("vm", {"name": "vm", "uuid": "not-a-uuid"}), "uuid"),
            (lambda r: r.__setitem__("vm", {"name": "", "uuid": UUID}), "VM name"),
            (lambda r: r.__setitem__("vm", {"name": "x" * 5000, "uuid": UUID}), "VM name"),
            (lambda r: r.__setitem__("vm", {"name": "vm", "uuid": UUID, "x": 1}), "keys"),
            (lambda r: r.__setitem__("vm", ["vm", UUID]), "object"),
            (lambda r: r.__setitem__("mode", "sideways"), "mode"),
            (lambda r: r.__setitem__("host", "h" * 5000), "host"),
            (lambda r: r.__setitem__("vbox_version", 7), "vbox_version"),
            (lambda r: r.__setitem__("cpu_portability", -1), "cpu_portability"),
            (lambda r: r.__setitem__("labels", "protected"), "list"),
            (lambda r: r.__setitem__("labels", [{"a": 1}]), "labels"),
            (lambda r: r.__setitem__("labels", [str(n) for n in range(300)]), "labels"),
            (lambda r: r.__setitem__("extra", [1]), "mapping"),
            (lambda r: r.__setitem__("extra", {"k": "x" * 70000}), "bytes"),
            (lambda r: r.__setitem__("extra", {"k": [[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]}), "deeper"),
        ],
    )
    def test_refused_with_the_archive_named(self, change, words):
        """Each hostile or malformed field is refused with ArchiveMetadataError naming the archive and the fault."""
        with pytest.raises(vbremote.ArchiveMetadataError, match=words) as caught:
            decode_comment(hostile(change), archive="nightly-1", location="ssh://store/vms")
        assert caught.value.archive == "nightly-1"
        assert caught.value.location == "ssh://store/vms"
        assert "'nightly-1'" in str(caught.value)
        assert isinstance(caught.value, vbremote.RepositoryError)
        assert isinstance(caught.value, ValueError)

    @pytest.mark.parametrize(
        ("comment", "words"),
        [
            ('{"vbremote": ' + "[" * 100_000 + "]" * 100_000 + "}", "nests too deep"),
            ('{"vbremote":1,"vm":{"name":"vm"', "not valid JSON"),
        ],
        ids=["too-deep", "truncated"],
    )
    def test_unparsable_record_is_refused(self, comment, words):
        """A comment that claims to be vbremote's but does not parse is refused, not taken for another tool's."""
        with pytest.raises(vbremote.ArchiveMetadataError, match=words) as caught:
            decode_comment(comment, archive="a")
        assert caught.value.archive == "a"

    def test_nan_is_refused(self):
        """NaN and Infinity, which strict JSON lacks, are refused wherever they appear."""
        comment = hostile(lambda r: r.__setitem__("extra", {"k": 1})).replace('"k": 1', '"k": NaN')
        assert '"k": NaN' in comment
        with pytest.raises(vbremote.ArchiveMetadataError, match="JSON"):
            decode_comment(comment, archive="a")

    def test_good_record_reads_back(self):
        """The reference record used above is itself accepted, with the instant, outside files and media."""
        decoded = decode_comment(json.dumps(good_record()))
        assert decoded is not None
        assert decoded[0].labels == frozenset({"daily"})
        assert decoded[0].taken == datetime(2026, 5, 1, 10, tzinfo=UTC)
        assert decoded[0].external == {"_external/data.vdi": "/srv/data.vdi"}
        assert [f.path for f in decoded[1]] == ["vm.vbox", "vm.vdi"]
        assert [(f.medium, f.parent) for f in decoded[1]] == [(None, None), (UUID, None)]

    def test_optional_keys_are_left_out(self):
        """Records without an instant, outside files or media leave those keys out (and read back as before)."""
        record = json.loads(encode_comment(
            vbremote.SnapshotMetadata("vm", UUID),
            [ArchiveFile("vm.vdi", vbremote.FileRole.DISK, 1, vbremote.Chunking.fixed(1 << 20))],
        ))
        assert "taken" not in record
        assert "external" not in record
        assert set(record["files"][0]) == {"path", "role", "size", "chunking"}

    def test_chunking_from_json_is_typed(self):
        """A short fixed chunking record raises the typed error, not IndexError."""
        with pytest.raises(vbremote.ArchiveMetadataError, match="header size"):
            vbremote.Chunking.from_json(["fixed", 1048576])
        with pytest.raises(vbremote.ArchiveMetadataError):
            vbremote.Chunking.from_json(["fixed", "1048576", "0"])
        assert vbremote.Chunking.from_json(["fixed", 2097152, 0]) == vbremote.Chunking.fixed(2 << 20)


class TestValidation:
    @pytest.mark.parametrize("path", ["", "/abs", "../up", "a/../b", "a//b", "./a", "a\\b", "."])
    def test_bad_archive_paths(self, path):
        """Archive paths must be relative, normalised and stay inside the VM folder."""
        with pytest.raises(vbremote.ConfigurationError):
            vbremote.FileSpec(Path("x"), path)

    def test_good_archive_path(self):
        """A nested relative path is accepted as is."""
        assert vbremote.FileSpec("x", "Snapshots/{abc}.vdi").path == "Snapshots/{abc}.vdi"

    @pytest.mark.parametrize("block_size", [0, 512, 3 << 20, 8 << 20])
    def test_block_sizes(self, block_size):
        """Only 1, 2 and 4 MiB blocks are accepted."""
        with pytest.raises(vbremote.ConfigurationError):
            vbremote.Chunking.fixed(block_size)

    def test_header_size(self):
        """A header chunk larger than a block is refused."""
        with pytest.raises(vbremote.ConfigurationError):
            vbremote.Chunking.fixed(1 << 20, (1 << 20) + 1)
        assert vbremote.Chunking.fixed(1 << 20, 1536).borg_params() == "fixed,1048576,1536"

    def test_labels(self):
        """Labels must be non-empty strings."""
        with pytest.raises(vbremote.ConfigurationError):
            vbremote.SnapshotMetadata("vm", UUID, labels={""})
        with pytest.raises(vbremote.ConfigurationError, match="not one string"):
            vbremote.SnapshotMetadata("vm", UUID, labels="protected")  # type: ignore[arg-type]

    def test_medium_uuids_and_instant(self):
        """Medium and parent uuids must be uuids (kept canonical); the instant must carry a timezone."""
        with pytest.raises(vbremote.ConfigurationError, match="medium uuid"):
            vbremote.FileSpec("x", "x.vdi", vbremote.FileRole.DISK, medium="x")
        spec = vbremote.FileSpec("x", "x.vdi", vbremote.FileRole.DISK, medium="{" + UUID.upper() + "}")
        assert spec.medium == UUID
        with pytest.raises(vbremote.ConfigurationError, match="timezone-aware"):
            vbremote.SnapshotMetadata("vm", UUID, taken=datetime(2026, 1, 1))

    def test_vm_uuid_is_a_uuid(self):
        """The VM uuid must parse as a uuid and is kept in canonical form."""
        with pytest.raises(vbremote.ConfigurationError, match="uuid"):
            vbremote.SnapshotMetadata("vm", "u")
        assert vbremote.SnapshotMetadata("vm", "{" + UUID.upper() + "}").vm_uuid == UUID

    def test_written_records_obey_the_read_rules(self):
        """encode_comment refuses what decode_comment would refuse: two files at one path."""
        a = ArchiveFile("a", vbremote.FileRole.DISK, 1, vbremote.Chunking.buzhash())
        with pytest.raises(vbremote.ConfigurationError, match="two files"):
            encode_comment(vbremote.SnapshotMetadata("vm", UUID), [a, a])


class TestHashable:
    def test_snapshot_metadata_is_hashable(self):
        """SnapshotMetadata is a hashable value: equal records hash equal and work as set members and keys."""
        one = vbremote.SnapshotMetadata("vm", UUID, labels={"a"}, extra={"k": [1, {"x": 2}]})
        two = vbremote.SnapshotMetadata("vm", UUID, labels=["a"], extra={"k": [1, {"x": 2}]})
        assert one == two
        assert hash(one) == hash(two)
        assert len({one, two}) == 1
        assert {one: 1}[two] == 1

    def test_archive_info_is_hashable(self):
        """Values holding metadata (ArchiveInfo) are hashable too."""
        meta = vbremote.SnapshotMetadata("vm", str(uuid.uuid4()), extra={"k": 1})
        f = ArchiveFile("vm.vdi", vbremote.FileRole.DISK, 1, vbremote.Chunking.fixed(1 << 20))
        from datetime import UTC, datetime

        info = vbremote.ArchiveInfo("a", "00" * 32, datetime.now(UTC), meta, (f,))
        assert hash(info) == hash(pickle.loads(pickle.dumps(info)))

    def test_extra_is_a_private_copy(self):
        """Changing the caller's dict afterwards does not change the frozen record."""
        extra: dict[str, Any] = {"k": [1]}
        meta = vbremote.SnapshotMetadata("vm", UUID, extra=extra)
        extra["k"].append(2)
        extra["new"] = 1
        assert meta.extra == {"k": [1]}

    def test_configuration_error_is_value_error(self):
        """ConfigurationError is also a ValueError, for callers that catch that."""
        assert issubclass(vbremote.ConfigurationError, ValueError)
