"""The public namespace is exactly what was meant."""

from __future__ import annotations

import importlib
import pickle
import types

import pytest

import vbremote
import vbremote.testing

EXPECTED = {
    "DEFAULT_BLOCK_SIZE", "DEFAULT_CHECKPOINT_INTERVAL", "DEFAULT_ENCRYPTION", "DEFAULT_READ_AHEAD", "ENCRYPTION_MODES",
    "ArchiveContents", "ArchiveInvalid", "ItemKind", "StoredItem",
    "AccessDenied", "ArchiveExists", "ArchiveFile", "ArchiveInfo", "ArchiveMetadataError", "ArchiveNotFound",
    "BorgError",
    "CheckResult", "ChunkRef", "Chunking", "CommandTransport", "CompactResult", "ConfigFileError", "ConfigurationError",
    "ConnectionFailed", "DeleteResult", "FileChunks", "FileNotInArchive", "FileRole", "FileSpec",
    "IntegrityError", "LocalTransport", "Passphrase", "PassphraseError", "PassphraseMissing",
    "PassphraseWrong", "Progress", "Repository", "RepositoryError", "RepositoryExists",
    "RepositoryLocked", "RepositoryNotFound", "RepositoryReadOnly", "SSHTransport", "SnapshotMetadata", "SnapshotMode",
    "SourceChanged", "Transport", "VBRemoteError", "WriteResult",
    "PROTECTED_LABEL", "Decision", "Guards", "KeepLabels", "KeepRules", "PlanEntry", "PruneError",
    "PruneRefused", "PrunePlan", "PruneResult", "Pruner", "RetentionPolicy", "SettingsFileError",
    "DiskAttachment", "InvalidVMState", "LockRetry", "MachineState", "MediumInfo", "SnapshotInfo",
    "SnapshotNotFound", "VMInfo", "VMLocked", "VMNotFound", "VirtualBoxError", "VirtualBoxHost",
    "VirtualBoxOperationFailed", "VirtualBoxTimeout", "VirtualBoxUnavailable",
    "RepositoryBusy", "ChunkStream", "FetchedChunk", "FetchErrors",
    "DEFAULT_NAME_TEMPLATE", "TRANSIENT_PREFIX", "SnapshotError", "SnapshotInProgress", "SnapshotResult",
    "SnapshotStats", "Snapshotter", "TransientSnapshotLeft",
    "ApplyStats", "BlockAction", "FilePlan", "PlanProblem", "RestoreError", "RestoreFileState", "RestorePlan",
    "RestoreLocked", "RestorePreflightFailed", "RestoreState", "TargetSpaceError", "Restorer", "RestoreResult",
    "ImageDrive",
}


def test_all_is_sorted_and_complete():
    """__all__ is sorted, names exactly the expected members, and each exists."""
    assert vbremote.__all__ == sorted(vbremote.__all__)
    assert set(vbremote.__all__) == EXPECTED
    for name in vbremote.__all__:
        assert getattr(vbremote, name) is not None


def _leaks(package: types.ModuleType) -> set[str]:
    """Public-looking names of a package that are neither exported nor submodules."""
    return {
        name
        for name, value in vars(package).items()
        if not name.startswith("_")
        and name not in package.__all__
        and not isinstance(value, types.ModuleType)
        and name != "annotations"  # bound by "from __future__ import annotations"
    }


@pytest.mark.parametrize("package", [vbremote, vbremote.testing], ids=lambda p: p.__name__)
def test_nothing_else_is_public(package):
    """No public-looking name escapes __all__ (helpers stay private, with a leading underscore)."""
    assert _leaks(package) == set()


@pytest.mark.parametrize("package", [vbremote, vbremote.testing], ids=lambda p: p.__name__)
def test_each_name_comes_from_its_defining_module(package):
    """Each exported class or function is re-exported under its own name from the private module that defines it."""
    for name in package.__all__:
        member = getattr(package, name)
        if not isinstance(member, type | types.FunctionType):
            continue
        module = importlib.import_module(member.__module__)
        assert module.__name__.startswith(package.__name__ + "._"), (name, module.__name__)
        assert member.__qualname__ == name, name
        assert getattr(module, name) is member, name
        assert name in module.__all__, (name, module.__name__)


def test_public_classes_pickle_by_reference():
    """Public classes pickle by reference (the worker receives values so), and exceptions keep their context."""
    for name in vbremote.__all__:
        member = getattr(vbremote, name)
        if isinstance(member, type):
            assert pickle.loads(pickle.dumps(member)) is member, name
    error = pickle.loads(pickle.dumps(vbremote.FileNotInArchive("m", location="l", archive="a", path="p")))
    assert (str(error), error.location, error.archive, error.path) == ("m", "l", "a", "p")


def test_error_tree():
    """Every error vbremote exports derives from VBRemoteError."""
    for name in vbremote.__all__:
        member = getattr(vbremote, name)
        if isinstance(member, type) and issubclass(member, BaseException):
            assert issubclass(member, vbremote.VBRemoteError), name


def test_testing_namespace():
    """vbremote.testing exports its checks and image helpers."""
    assert set(vbremote.testing.__all__) == {
        "MIB", "TransportCheckFailed", "check_transport", "guest_write", "make_vdi", "mixed_content",
        "qemu_tools_available", "VIRTUALBOX_PROFILES", "Fault", "GuestWorkload", "SimulatedVBoxError",
        "SimulatedVirtualBox", "Timing", "VirtualBoxManager",
    }
