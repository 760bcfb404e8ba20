"""vbremote: external snapshots for VirtualBox VMs, stored in a borg repository.

The public names live here; the modules behind them are private.
"""

from __future__ import annotations

from ._errors import (
    AccessDenied,
    ArchiveExists,
    ArchiveNotFound,
    BorgError,
    ConfigurationError,
    ConnectionFailed,
    FileNotInArchive,
    IntegrityError,
    PassphraseError,
    PassphraseMissing,
    PassphraseWrong,
    RepositoryError,
    RepositoryExists,
    RepositoryLocked,
    RepositoryNotFound,
    SourceChanged,
    VBRemoteError,
)
from ._models import (
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
    SnapshotMode,
    WriteResult,
)
from ._repository import DEFAULT_BLOCK_SIZE, DEFAULT_ENCRYPTION, ENCRYPTION_MODES, Passphrase, Repository
from ._transports import CommandTransport, LocalTransport, SSHTransport, Transport

__version__ = "0.1.0.dev0"

__all__ = [
    "AccessDenied",
    "ArchiveExists",
    "ArchiveFile",
    "ArchiveInfo",
    "ArchiveNotFound",
    "BorgError",
    "CheckResult",
    "ChunkRef",
    "Chunking",
    "CommandTransport",
    "CompactResult",
    "ConfigurationError",
    "ConnectionFailed",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_ENCRYPTION",
    "DeleteResult",
    "ENCRYPTION_MODES",
    "FileChunks",
    "FileNotInArchive",
    "FileRole",
    "FileSpec",
    "IntegrityError",
    "LocalTransport",
    "Passphrase",
    "PassphraseError",
    "PassphraseMissing",
    "PassphraseWrong",
    "Progress",
    "Repository",
    "RepositoryError",
    "RepositoryExists",
    "RepositoryLocked",
    "RepositoryNotFound",
    "SSHTransport",
    "SnapshotMetadata",
    "SnapshotMode",
    "SourceChanged",
    "Transport",
    "VBRemoteError",
    "WriteResult",
]
