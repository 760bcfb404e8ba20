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
    "check_lockable",
    "check_mutable",
    "check_open",
    "check_session_machine",
    "holder_has_console",
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
#: ``launchVMProcess`` (Starting/Restoring -> Running, or back when a disk is
#: inaccessible), ``powerDown``
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
    # A start that fails (an inaccessible disk) goes back: Console::i_powerDown (ConsoleImpl.cpp).
    "Starting": frozenset({"Running", "Aborted", "PoweredOff"}),
    "Restoring": frozenset({"Running", "Aborted", "AbortedSaved", "Saved"}),
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


def check_open(session: _Session) -> None:
    """``CHECK_OPEN`` of ``SessionImpl.cpp``: a session that is not locked answers only its state.

    Raises:
        SimulatedVBoxError: ``E_UNEXPECTED``, as ``Session::getType``, ``getMachine``,
            ``getConsole`` and ``unlockMachine`` give.
    """
    if session.state != "Locked":
        raise SimulatedVBoxError("E_UNEXPECTED", f"The session is not locked (session state: {session.state})")


def check_lockable(machine: _Machine, session: _Session) -> None:
    """The checks ``Machine::lockMachine`` and ``Machine::launchVMProcess`` make first (caller holds the host lock)."""
    if session.state != "Unlocked":
        raise SimulatedVBoxError("VBOX_E_INVALID_OBJECT_STATE", "The given session is busy")
    if not machine.registered:
        raise SimulatedVBoxError("E_UNEXPECTED", f"The machine '{machine.name}' is not registered")


def holder_has_console(machine: _Machine) -> bool:
    """Whether the write holder has a console to share: the VM process, or a session locked as ``VM``."""
    holder = machine.holder
    return holder == "vm" or (isinstance(holder, _Session) and holder.lock_type == "VM")


def lock_machine(host: HostLock, machine: _Machine, session: _Session, lock_type: str) -> None:
    """``IMachine.lockMachine`` (``Machine::lockMachine``, ``MachineImpl.cpp``, 6.1.38 to 7.1.12).

    ``lock_type`` is ``"Shared"``, ``"Write"`` or ``"VM"``. A shared lock on a
    locked machine links the session to the holder's session machine and, only
    if the holder locked as ``VM``, its console; any other lock of a locked (or
    unlocking) machine is refused. An unlocked machine is write-locked whatever
    the type asked for, and only a ``VM`` lock makes a console
    (``Session::assignMachine``).
    """
    with host:
        check_lockable(machine, session)
        if is_locked(machine):
            if lock_type == "Shared" and machine.holder is not None:
                session.state, session.type, session.machine = "Locked", "Shared", machine
                session.console = holder_has_console(machine)
                machine.shared.add(session)
                return
            raise SimulatedVBoxError(
                "VBOX_E_INVALID_OBJECT_STATE",
                f"The machine '{machine.name}' is already locked for a session (or being unlocked)",
            )
        session.state, session.type, session.machine = "Locked", "WriteLock", machine
        session.lock_type = lock_type
        session.console = lock_type == "VM"
        machine.holder = session


def unlock(host: HostLock, session: _Session) -> None:
    """``ISession.unlockMachine``; a write holder's uncommitted settings are discarded.

    When the write holder unlocks, its session machine goes, and with it every
    shared session on it (``SessionMachine::uninit`` uninitializes the remote
    controls, ``MachineImpl.cpp``).
    """
    with host:
        check_open(session)
        machine = session.machine
        assert machine is not None
        machine.shared.discard(session)
        if machine.holder is session:
            machine.holder = None
            machine.pending_cpuid = None  # uncommitted changes are discarded, as on VirtualBox
            release_clients(machine)
        _reset(session)


def _reset(session: _Session) -> None:
    session.state, session.type, session.machine = "Unlocked", "Null", None
    session.lock_type, session.console = "Null", False


def release_clients(machine: _Machine) -> None:
    """The session machine went: its shared client sessions are unlocked (caller holds the host lock)."""
    for session in list(machine.shared):
        _reset(session)
    machine.shared.clear()


def vm_process_ended(host: HostLock, machine: _Machine, unlock_delay: float) -> None:
    """The VM process released the machine; it stays "being unlocked" for ``unlock_delay`` seconds.

    Its session machine goes, so the shared sessions on it are unlocked
    (``SessionMachine::uninit``).
    """
    with host:
        if machine.holder == "vm":
            machine.holder = None
            machine.unlocking_until = time.monotonic() + unlock_delay
            release_clients(machine)


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
