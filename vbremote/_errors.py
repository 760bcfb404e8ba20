"""The exceptions vbremote raises.

Every error vbremote raises on purpose derives from :class:`VBRemoteError`.
Errors of foreign libraries (borg, the ssh client) are translated at the
adapter boundary and raised ``from`` the original, so callers catch one tree::

    VBRemoteError
    ├── ConfigurationError (also ValueError)       bad arguments, invalid options
    │   └── ConfigFileError                        the command's config file: names the file and the key
    ├── RepositoryError                            anything about a borg repository
    │   ├── RepositoryNotFound
    │   ├── RepositoryExists
    │   ├── PassphraseError
    │   │   ├── PassphraseMissing                  encrypted, and no passphrase given
    │   │   └── PassphraseWrong
    │   ├── RepositoryLocked                       still locked after ``lock_wait``
    │   ├── RepositoryBusy                         called again from the thread that is using it
    │   ├── ConnectionFailed                       the transport did not reach ``borg serve``
    │   │   └── AccessDenied                       the server refused the path or operation
    │   ├── IntegrityError                         a chunk or object failed verification
    │   ├── ArchiveNotFound
    │   ├── ArchiveExists
    │   ├── FileNotInArchive
    │   ├── ArchiveInvalid (also ValueError)        an archive's items are malformed or hostile
    │   │   └── ArchiveMetadataError                its vbremote metadata is malformed or hostile
    │   ├── RepositoryReadOnly                     a write to a repository opened with ``read_only=True``
    │   ├── SourceChanged                          a local file changed while it was read
    │   └── BorgError                              any other failure reported by borg
    ├── SnapshotError                              taking a snapshot (Snapshotter)
    │   ├── SnapshotInProgress                     a snapshot run or a restore holds the VM's lock
    │   └── TransientSnapshotLeft                  the run's transient snapshot could not be deleted
    ├── RestoreError                               a restore could not be planned or applied
    │   ├── RestorePreflightFailed                 a preflight check refused the restore; nothing was written
    │   ├── RestoreLocked                          a snapshot run or another restore holds the VM or the target
    │   └── TargetSpaceError                       the target folder's file system is full
    ├── PruneError                                 pruning
    │   └── PruneRefused                           a guard (or an append-only repository) said no
    ├── SettingsFileError (also ValueError)        a .vbox file that is malformed, hostile or unexpected
    └── VirtualBoxError                            anything VirtualBox refused or failed
        ├── VirtualBoxUnavailable                  vboxapi is not installed or the service is not running
        ├── VMNotFound                             no registered VM of that name or uuid
        ├── SnapshotNotFound
        ├── InvalidVMState                         the VM's state does not allow the operation
        ├── VMLocked                               another session held the VM through every retry
        ├── VirtualBoxTimeout                      an operation did not finish in time
        └── VirtualBoxOperationFailed              VirtualBox reported a failure (its text and result code)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._models import ArchiveInfo

__all__ = [
    "AccessDenied",
    "ArchiveExists",
    "ArchiveInvalid",
    "ArchiveMetadataError",
    "ArchiveNotFound",
    "BorgError",
    "ConfigFileError",
    "ConfigurationError",
    "ConnectionFailed",
    "FileNotInArchive",
    "IntegrityError",
    "InvalidVMState",
    "PassphraseError",
    "PassphraseMissing",
    "PassphraseWrong",
    "PruneError",
    "PruneRefused",
    "RepositoryError",
    "RepositoryExists",
    "RepositoryBusy",
    "RepositoryLocked",
    "RepositoryNotFound",
    "RepositoryReadOnly",
    "RestoreError",
    "RestoreLocked",
    "RestorePreflightFailed",
    "SettingsFileError",
    "SnapshotError",
    "SnapshotInProgress",
    "SnapshotNotFound",
    "SourceChanged",
    "TargetSpaceError",
    "TransientSnapshotLeft",
    "VBRemoteError",
    "VMLocked",
    "VMNotFound",
    "VirtualBoxError",
    "VirtualBoxOperationFailed",
    "VirtualBoxTimeout",
    "VirtualBoxUnavailable",
]


class VBRemoteError(Exception):
    """Base of every error vbremote raises on purpose."""


class ConfigurationError(VBRemoteError, ValueError):
    """An argument or option is invalid; nothing was changed."""


class ConfigFileError(ConfigurationError):
    """The ``vbremote`` command's config file is unreadable or has a bad value.

    Attributes:
        file: The config file's path.
        key: The dotted key at fault (e.g. ``repositories.main.path``); empty
            when the file as a whole is at fault (missing, not TOML).
    """

    def __init__(self, message: str, *, file: str = "", key: str = "") -> None:
        super().__init__(message)
        self.file = file
        self.key = key


class RepositoryError(VBRemoteError):
    """A borg repository operation failed.

    Attributes:
        location: The repository's location as the transport describes it
            (empty when not known).
    """

    def __init__(self, message: str, *, location: str = "") -> None:
        super().__init__(message)
        self.location = location


class RepositoryNotFound(RepositoryError):
    """No borg repository exists at the location."""


class RepositoryExists(RepositoryError):
    """``Repository.init`` found a repository (or a non-empty folder) already there."""


class PassphraseError(RepositoryError):
    """The repository key could not be unlocked."""


class PassphraseMissing(PassphraseError):
    """The repository is encrypted and no passphrase was given or found in borg's variables."""


class PassphraseWrong(PassphraseError):
    """The passphrase given does not unlock the repository key."""


class RepositoryLocked(RepositoryError):
    """Another process holds the repository lock and ``lock_wait`` ran out."""


class RepositoryBusy(RepositoryError):
    """The repository was used again from the thread that is in the middle of using it.

    For example a call made while this thread still reads a :meth:`Repository.fetch`
    stream, or from inside a progress callback. Waiting could never end, so
    vbremote refuses at once; finish (or leave) the first use and call again.
    Other threads simply wait their turn.
    """


class ConnectionFailed(RepositoryError):
    """The transport could not reach ``borg serve``; the message carries the remote's words."""


class AccessDenied(ConnectionFailed):
    """The server refused the repository path or the operation (e.g. ``--restrict-to-path``)."""


class IntegrityError(RepositoryError):
    """Stored data failed verification.

    Attributes:
        chunk_id: The hex id of the chunk that failed, when one chunk is to blame.
        path: In a restore, the target file (relative to the target folder) where
            the bad data belongs; None otherwise.
        offset: In a restore, the byte offset in ``path`` of the first place that
            needed that data; None otherwise.
    """

    def __init__(
        self,
        message: str,
        *,
        location: str = "",
        chunk_id: str | None = None,
        path: str | None = None,
        offset: int | None = None,
    ) -> None:
        super().__init__(message, location=location)
        self.chunk_id = chunk_id
        self.path = path
        self.offset = offset


class ArchiveNotFound(RepositoryError):
    """No archive of that name exists in the repository.

    Attributes:
        archive: The name asked for.
    """

    def __init__(self, message: str, *, location: str = "", archive: str = "") -> None:
        super().__init__(message, location=location)
        self.archive = archive


class ArchiveExists(RepositoryError):
    """An archive of that name already exists in the repository.

    Attributes:
        archive: The name that is taken.
    """

    def __init__(self, message: str, *, location: str = "", archive: str = "") -> None:
        super().__init__(message, location=location)
        self.archive = archive


class FileNotInArchive(RepositoryError):
    """The archive has no file at that archive-relative path.

    Attributes:
        archive: The archive searched.
        path: The archive-relative path asked for.
    """

    def __init__(self, message: str, *, location: str = "", archive: str = "", path: str = "") -> None:
        super().__init__(message, location=location)
        self.archive = archive
        self.path = path


class ArchiveInvalid(RepositoryError, ValueError):
    """What an archive says about its items is malformed or hostile; nothing was used.

    An archive is input from a server that may be compromised: item paths
    that leave the target folder, duplicates, or chunk sizes that do not add
    up are refused rather than trusted (:meth:`Repository.chunk_lists`). Its
    subclass :class:`ArchiveMetadataError` is about vbremote's own record in
    the archive comment, so ``except ArchiveInvalid`` catches both.

    Attributes:
        archive: The archive read.
        path: The item at fault, where one is.
    """

    def __init__(self, message: str, *, location: str = "", archive: str = "", path: str = "") -> None:
        super().__init__(message, location=location)
        self.archive = archive
        self.path = path


class ArchiveMetadataError(ArchiveInvalid):
    """An archive's vbremote metadata is malformed or hostile, and was refused.

    Archive metadata comes from the repository server, which may be
    compromised: every path, role, size, chunking and string in it is checked
    each time it is read. An archive that fails is never used (see
    ``docs/repositories.md``, "Untrusted archives").

    Attributes:
        archive: The archive's name (empty when the record was checked on its own).
    """

    def __init__(self, message: str, *, location: str = "", archive: str = "") -> None:
        super().__init__(message, location=location, archive=archive)


class RepositoryReadOnly(RepositoryError):
    """A write was asked of a repository opened with ``read_only=True``; nothing was changed."""


class SourceChanged(RepositoryError):
    """A local file changed size while it was being stored; nothing was committed."""


class BorgError(RepositoryError):
    """borg reported a failure that has no more specific class here.

    Attributes:
        borg_class: The name of borg's exception class, for diagnostics.
    """

    def __init__(self, message: str, *, location: str = "", borg_class: str = "") -> None:
        super().__init__(message, location=location)
        self.borg_class = borg_class


class RestoreError(VBRemoteError):
    """A restore could not be planned or applied.

    Attributes:
        archive: The archive being restored, where known.
        path: The target file concerned (relative to the target folder), where one is.
        offset: The byte offset in ``path``, where one is to blame.
    """

    def __init__(self, message: str, *, archive: str = "", path: str | None = None, offset: int | None = None) -> None:
        super().__init__(message)
        self.archive = archive
        self.path = path
        self.offset = offset


class RestorePreflightFailed(RestoreError):
    """A preflight check refused the restore (see the plan's problems); nothing was written.

    Attributes:
        problems: The plan's problems (each with ``code``, ``message`` and ``remedy``).
    """

    def __init__(self, message: str, *, archive: str = "", problems: tuple[Any, ...] = ()) -> None:
        super().__init__(message, archive=archive)
        self.problems = problems


class RestoreLocked(RestoreError):
    """A snapshot run or another restore on this host holds the VM's lock or the target folder's; nothing was done.

    See ``Restorer(lock_wait=...)``. The VM is left as it was (still
    registered, its files untouched).

    Attributes:
        vm: The VM (name or uuid) whose archive was being restored.
        lock_file: The lock file that is held.
    """

    def __init__(self, message: str, *, archive: str = "", vm: str = "", lock_file: str = "") -> None:
        super().__init__(message, archive=archive)
        self.vm = vm
        self.lock_file = lock_file


class TargetSpaceError(RestoreError):
    """The target folder's file system ran out of space (or quota) during a restore.

    What was written and made durable is recorded in the restore journal; run
    the restore again once space is freed and it continues.
    """


class SnapshotError(VBRemoteError):
    """Taking a snapshot failed or was refused.

    Attributes:
        vm: The VM (name or uuid) being snapshotted.
    """

    def __init__(self, message: str, *, vm: str = "") -> None:
        super().__init__(message)
        self.vm = vm


class SnapshotInProgress(SnapshotError):
    """Another snapshot run or a restore on this host holds the VM's lock; nothing was done.

    See ``Snapshotter(lock_wait=...)``.

    Attributes:
        lock_file: The lock file that is held.
    """

    def __init__(self, message: str, *, vm: str = "", lock_file: str = "") -> None:
        super().__init__(message, vm=vm)
        self.lock_file = lock_file


class TransientSnapshotLeft(SnapshotError):
    """The run's transient VirtualBox snapshot could not be deleted.

    Raised after the archive committed (``archive`` is set; the snapshot is
    safe in the repository), or when a leftover of an earlier run could not be
    removed before a new run (``archive`` is ``None``). The VM keeps the
    snapshot and its differencing images until it is deleted: the next run
    removes it, or delete it by hand (``VBoxManage snapshot VM delete UUID``).

    Attributes:
        snapshot: The uuid of the snapshot left on the VM.
        snapshot_name: Its name.
        archive: The archive that committed, or ``None``.
    """

    def __init__(
        self,
        message: str,
        *,
        vm: str = "",
        snapshot: str = "",
        snapshot_name: str = "",
        archive: ArchiveInfo | None = None,
    ) -> None:
        super().__init__(message, vm=vm)
        self.snapshot = snapshot
        self.snapshot_name = snapshot_name
        self.archive = archive


class PruneError(VBRemoteError):
    """Pruning failed or was refused.

    Attributes:
        vm: The VM (name or uuid) being pruned.
    """

    def __init__(self, message: str, *, vm: str = "") -> None:
        super().__init__(message)
        self.vm = vm


class PruneRefused(PruneError):
    """A guard refused to prune (e.g. backups stopped), or deletes would free nothing; nothing was deleted."""


class SettingsFileError(VBRemoteError, ValueError):
    """A VirtualBox settings file is malformed, hostile (entities, huge), or not in the expected state."""


class VirtualBoxError(VBRemoteError):
    """VirtualBox refused or failed an operation.

    Attributes:
        vm: The VM (name or uuid) concerned, where there is one.
        result_code: VirtualBox's COM result code (unsigned, e.g. ``0x80BB0002``), where there is one.
        text: VirtualBox's own message, where there is one.
        snapshot_id: The uuid of the snapshot an interrupted or failed
            :meth:`~vbremote.VirtualBoxHost.take_snapshot` asked VirtualBox
            for, once VirtualBox had accepted the request (the snapshot may
            exist: look it up and delete it if unwanted); else ``None``.
    """

    def __init__(
        self,
        message: str,
        *,
        vm: str = "",
        result_code: int | None = None,
        text: str = "",
        snapshot_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.vm = vm
        self.result_code = result_code
        self.text = text
        self.snapshot_id = snapshot_id


class VirtualBoxUnavailable(VirtualBoxError):
    """VirtualBox's Python bindings (vboxapi) are not importable, or the VirtualBox service is not reachable."""


class VMNotFound(VirtualBoxError):
    """No registered VM has that name or uuid."""


class SnapshotNotFound(VirtualBoxError):
    """The VM has no snapshot of that name or uuid."""


class InvalidVMState(VirtualBoxError):
    """The VM's state does not allow the operation (e.g. restoring a snapshot of a running VM).

    Attributes:
        state: The VM's state when the operation was refused, where known.
    """

    def __init__(
        self, message: str, *, vm: str = "", result_code: int | None = None, text: str = "", state: object = None
    ) -> None:
        super().__init__(message, vm=vm, result_code=result_code, text=text)
        self.state = state


class VMLocked(VirtualBoxError):
    """Another session held the VM's lock through every retry."""


class VirtualBoxTimeout(VirtualBoxError):
    """A VirtualBox operation did not finish in the time given (a cancelable one was canceled)."""


class VirtualBoxOperationFailed(VirtualBoxError):
    """VirtualBox reported a failure; ``text`` and ``result_code`` carry its words."""
