"""Sessions and machine states: locking and unlocking machines, session checks, and the state machine.

:data:`TRANSITIONS` is the one table of the machine-state changes the
simulator makes; :func:`set_state` refuses any other with
:class:`IllegalTransition` (a simulator bug, not a VirtualBox error). Every
function here takes the host lock itself where it changes shared state.
"""

from __future__ import annotations

import time

from ._locks import HostLock
from ._model import OFFLINE, SimulatedVBoxError, _Machine, _Session, now_iso

__all__ = [
    "TRANSITIONS",
    "IllegalTransition",
    "check_mutable",
    "check_session_machine",
    "is_locked",
    "lock_machine",
    "release_clients",
    "set_state",
    "unlock",
    "vm_process_ended",
]

# The operations that may start from an offline machine, with the transient state each enters.
_FROM_OFFLINE = frozenset({"Snapshotting", "DeletingSnapshot", "RestoringSnapshot"})
# An operation that was under way when the VM process crashed still ends by
# setting the state it ends in (the simulator does not abort it), over Aborted.
_AFTER_CRASH = frozenset({"Running", "Paused", *OFFLINE})

#: Machine state -> the states the simulator may move it to, and by what:
#: ``launchVMProcess`` (Starting/Restoring -> Running), ``powerDown``
#: (Stopping -> PoweredOff), ``pause``/``resume``, ``saveState`` (Saving ->
#: Saved), ``discardSavedState``, ``takeSnapshot`` (a snapshotting state,
#: then back), ``deleteSnapshot`` (a deleting state, then back),
#: ``restoreSnapshot`` (RestoringSnapshot -> Saved or PoweredOff) and a crash
#: of the VM process (-> Aborted, from every state with a VM process or an
#: operation under way).
TRANSITIONS: dict[str, frozenset[str]] = {
    "PoweredOff": frozenset({"Starting", *_FROM_OFFLINE}),
    "Aborted": frozenset({"Starting", *_FROM_OFFLINE, *_AFTER_CRASH}),
    "Teleported": frozenset({"Starting", *_FROM_OFFLINE}),
    "Saved": frozenset({"Restoring", "PoweredOff", *_FROM_OFFLINE}),
    "AbortedSaved": frozenset({"Restoring", "PoweredOff", *_FROM_OFFLINE}),
    "Starting": frozenset({"Running", "Aborted"}),
    "Restoring": frozenset({"Running", "Aborted"}),
    "Running": frozenset({"Paused", "Stopping", "Saving", "LiveSnapshotting", "OnlineSnapshotting",
                          "DeletingSnapshotOnline", "Aborted"}),
    # Never LiveSnapshotting from Paused: takeSnapshot (SnapshotImpl.cpp) sets
    # OnlineSnapshotting for a Paused machine on every release.
    "Paused": frozenset({"Running", "Stopping", "Saving", "OnlineSnapshotting",
                         "DeletingSnapshotPaused", "Aborted"}),
    "Stuck": frozenset({"Stopping", "Aborted"}),
    "Stopping": frozenset({"PoweredOff", "Aborted"}),
    "Saving": frozenset({"Saved", "Aborted"}),
    "LiveSnapshotting": frozenset({"Running", "Paused", "Aborted"}),
    "OnlineSnapshotting": frozenset({"Running", "Paused", "Aborted"}),
    "Snapshotting": frozenset(OFFLINE),
    "DeletingSnapshotOnline": frozenset({"Running", "Aborted"}),
    "DeletingSnapshotPaused": frozenset({"Paused", "Aborted"}),
    "DeletingSnapshot": frozenset(OFFLINE),
    "RestoringSnapshot": frozenset({"Saved", "PoweredOff", "Aborted"}),
}

# The states whose entry VirtualBox records as the machine's lastStateChange.
_STAMPED = ("PoweredOff", "Saved", "Aborted", "AbortedSaved", "Running", "Paused")


class IllegalTransition(RuntimeError):
    """A simulator bug: a machine-state change that :data:`TRANSITIONS` does not allow."""


def set_state(host: HostLock, machine: _Machine, state: str) -> None:
    """Move the machine to ``state``.

    Raises:
        IllegalTransition: :data:`TRANSITIONS` does not allow it.
    """
    with host:
        if state not in TRANSITIONS.get(machine.state, frozenset()):
            raise IllegalTransition(f"{machine.name}: no transition from {machine.state} to {state}")
        machine.state = state
        if state in _STAMPED:
            machine.last_state_change = now_iso()


def is_locked(machine: _Machine) -> bool:
    """Whether a session or the VM process holds the machine, or it is still being unlocked."""
    return machine.holder is not None or time.monotonic() < machine.unlocking_until


def lock_machine(host: HostLock, machine: _Machine, session: _Session, lock_type: str) -> None:
    """``IMachine.lockMachine``: ``lock_type`` is ``"Shared"`` or ``"Write"``."""
    with host:
        if session.state != "Unlocked":
            raise SimulatedVBoxError("VBOX_E_INVALID_SESSION_STATE", "The given session is busy")
        if not machine.registered:
            raise SimulatedVBoxError("VBOX_E_INVALID_OBJECT_STATE", f"Machine '{machine.name}' is not registered")
        if is_locked(machine):
            if lock_type == "Shared" and machine.holder is not None:
                session.state, session.type, session.machine = "Locked", "Shared", machine
                machine.shared.add(session)
                return
            raise SimulatedVBoxError(
                "VBOX_E_INVALID_OBJECT_STATE",
                f"The machine '{machine.name}' is already locked by a session (or being locked or unlocked)",
            )
        # Not locked: a shared request gets the write lock, as on VirtualBox.
        session.state, session.type, session.machine = "Locked", "WriteLock", machine
        machine.holder = session


def unlock(host: HostLock, session: _Session) -> None:
    """``ISession.unlockMachine``; a write holder's uncommitted settings are discarded."""
    with host:
        if session.state != "Locked" or session.machine is None:
            raise SimulatedVBoxError(
                "VBOX_E_INVALID_SESSION_STATE", f"The session is not locked (session state: {session.state})"
            )
        machine = session.machine
        machine.shared.discard(session)
        if machine.holder is session:
            machine.holder = None
            machine.pending_cpuid = None  # uncommitted changes are discarded, as on VirtualBox
        session.state, session.type, session.machine = "Unlocked", "Null", None


def release_clients(machine: _Machine) -> None:
    """The VM process died: its shared client sessions are unlocked (caller holds the host lock)."""
    for session in list(machine.shared):
        session.state, session.type, session.machine = "Unlocked", "Null", None
    machine.shared.clear()


def vm_process_ended(host: HostLock, machine: _Machine, unlock_delay: float) -> None:
    """The VM process released the machine; it stays "being unlocked" for ``unlock_delay`` seconds."""
    with host:
        if machine.holder == "vm":
            machine.holder = None
            machine.unlocking_until = time.monotonic() + unlock_delay


def check_session_machine(machine: _Machine, session: _Session) -> None:
    """Raise unless ``session`` is still locked on ``machine``."""
    if session.state != "Locked" or session.machine is not machine:
        raise SimulatedVBoxError("E_ACCESSDENIED", "The session is no longer locked on this machine")


def check_mutable(machine: _Machine, session: _Session | None) -> None:
    """Raise unless ``session`` is the write holder of ``machine`` and the machine is off (not Saved)."""
    # Only the write-locked session machine of a machine that is off is
    # mutable (Saved is not: its settings must match the saved state).
    owner = session is not None and session.machine is machine and machine.holder is session
    if not owner or machine.state not in ("PoweredOff", "Aborted", "Teleported"):
        message = f"The machine is not mutable (state is {machine.state})"
        raise SimulatedVBoxError("VBOX_E_INVALID_VM_STATE", message)
