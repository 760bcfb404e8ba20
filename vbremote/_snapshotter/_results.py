"""What a snapshot run returns."""

from __future__ import annotations

from attrs import frozen

from .._models import ArchiveInfo, MachineState, SnapshotInfo, SnapshotMode

__all__ = ["SnapshotResult", "SnapshotStats"]


@frozen
class SnapshotStats:
    """What a snapshot run cost.

    Attributes:
        bytes_read: Bytes read from the frozen files.
        bytes_new: Plaintext bytes of chunks the repository did not have.
        bytes_stored: Bytes those new chunks took after compression and encryption.
        chunks: Chunks in the archive's files.
        chunks_new: Chunks sent to the repository.
        chunks_zero: All-zero chunks (neither hashed nor compressed).
        seconds_snapshot: Taking the transient snapshot (and, for ``migrate``, saving the state first).
        seconds_archive: Reading the frozen files into the archive, up to its commit.
        seconds_merge: Deleting the transient snapshot (merging its differencing images).
        seconds_transient: How long the transient snapshot existed.
    """

    bytes_read: int
    bytes_new: int
    bytes_stored: int
    chunks: int
    chunks_new: int
    chunks_zero: int
    seconds_snapshot: float
    seconds_archive: float
    seconds_merge: float
    seconds_transient: float


@frozen
class SnapshotResult:
    """The outcome of :meth:`vbremote.Snapshotter.take`.

    Attributes:
        archive: The new archive.
        mode: How the snapshot was taken (``auto`` resolved).
        stats: What it cost.
        leftovers: Transient snapshots of crashed earlier runs that this run deleted.
        vm_state: The VM's state when the run ended (``Saved`` after ``migrate``;
            ``Aborted`` if the VM crashed during the run: the archive still
            holds the instant, taken before the crash).
    """

    archive: ArchiveInfo
    mode: SnapshotMode
    stats: SnapshotStats
    leftovers: tuple[SnapshotInfo, ...]
    vm_state: MachineState
