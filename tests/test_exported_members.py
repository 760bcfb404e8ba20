"""The public namespace is exactly what was meant."""

from __future__ import annotations

import vbremote
import vbremote.testing

EXPECTED = {
    "DEFAULT_BLOCK_SIZE", "DEFAULT_ENCRYPTION", "DEFAULT_READ_AHEAD", "ENCRYPTION_MODES",
    "ArchiveContents", "ArchiveInvalid", "ItemKind", "StoredItem",
    "AccessDenied", "ArchiveExists", "ArchiveFile", "ArchiveInfo", "ArchiveNotFound", "BorgError",
    "CheckResult", "ChunkRef", "Chunking", "CommandTransport", "CompactResult", "ConfigurationError",
    "ConnectionFailed", "DeleteResult", "FileChunks", "FileNotInArchive", "FileRole", "FileSpec",
    "IntegrityError", "LocalTransport", "Passphrase", "PassphraseError", "PassphraseMissing",
    "PassphraseWrong", "Progress", "Repository", "RepositoryError", "RepositoryExists",
    "RepositoryLocked", "RepositoryNotFound", "SSHTransport", "SnapshotMetadata", "SnapshotMode",
    "SourceChanged", "Transport", "VBRemoteError", "WriteResult",
    "PROTECTED_LABEL", "Decision", "Guards", "KeepLabels", "KeepRules", "PlanEntry", "PruneError",
    "PruneRefused", "PrunePlan", "PruneResult", "Pruner", "RetentionPolicy", "SettingsFileError",
    "DiskAttachment", "InvalidVMState", "LockRetry", "MachineState", "MediumInfo", "SnapshotInfo",
    "SnapshotNotFound", "VMInfo", "VMLocked", "VMNotFound", "VirtualBoxError", "VirtualBoxHost",
    "VirtualBoxOperationFailed", "VirtualBoxTimeout", "VirtualBoxUnavailable",
}


def test_all_is_sorted_and_complete():
    """__all__ is sorted, names exactly the expected members, and each exists."""
    assert vbremote.__all__ == sorted(vbremote.__all__)
    assert set(vbremote.__all__) == EXPECTED
    for name in vbremote.__all__:
        assert getattr(vbremote, name) is not None


def test_public_members_claim_the_package():
    """Public classes and functions say they belong to vbremote (not a private module) in docs."""
    for name in vbremote.__all__:
        member = getattr(vbremote, name)
        if isinstance(member, type):
            assert member.__module__.startswith("vbremote")


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
