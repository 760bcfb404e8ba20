"""Values: validation and the metadata record stored with each archive."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import vbremote
from vbremote._models import ArchiveFile, decode_comment, encode_comment

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
)
chunkings = st.one_of(
    st.builds(vbremote.Chunking.fixed, st.sampled_from([1 << 20, 2 << 20, 4 << 20]), st.integers(0, 1 << 20)),
    st.just(vbremote.Chunking.buzhash()),
)
files_strategy = st.lists(
    st.builds(
        ArchiveFile,
        path=st.from_regex(r"[a-z]{1,8}(/[a-z0-9.]{1,8}){0,2}", fullmatch=True),
        role=st.sampled_from(vbremote.FileRole),
        size=st.integers(0, 2**50),
        chunking=chunkings,
    ),
    max_size=5,
)


class TestMetadataRecord:
    @given(metadata_strategy, files_strategy)
    def test_roundtrip(self, metadata, files):
        """Any metadata and file list survive the archive comment unchanged."""
        decoded = decode_comment(encode_comment(metadata, files))
        assert decoded == (metadata, tuple(files))

    @pytest.mark.parametrize(
        "comment", ["", "hello", "{", "[]", '{"vbremote": 99}', '{"vbremote": 1}', '{"vbremote": 1, "vm": 3}']
    )
    def test_foreign_comments(self, comment):
        """Comments that are not vbremote's record decode to None instead of failing."""
        assert decode_comment(comment) is None

    def test_record_is_plain_json(self):
        """The record is compact JSON with a format version, readable without vbremote."""
        record = json.loads(encode_comment(vbremote.SnapshotMetadata("vm", "u"), []))
        assert record["vbremote"] == 1
        assert record["vm"] == {"name": "vm", "uuid": "u"}


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
            vbremote.SnapshotMetadata("vm", "u", labels={""})

    def test_configuration_error_is_value_error(self):
        """ConfigurationError is also a ValueError, for callers that catch that."""
        assert issubclass(vbremote.ConfigurationError, ValueError)
