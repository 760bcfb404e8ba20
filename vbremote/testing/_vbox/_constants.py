"""The VirtualBox API constants the simulator serves, per version profile.

Values are those of VirtualBox's ``src/VBox/Main/idl/VirtualBox.xidl`` for
each release line (read in the 6.1.38, 7.0.2, 7.0.6, 7.0.18 and 7.1.12 release
trees and the public 7.2 tree). The shift that matters to vbremote: 7.0 added
``MachineState_AbortedSaved`` (5) after ``Aborted``, so every state from
``Running`` to ``Snapshotting`` moved up by one, and with them the range
markers (``FirstOnline``/``LastOnline`` 5/18 in 6.1, 6/19 from 7.0;
``FirstTransient``/``LastTransient`` 8/22 and 9/23). 6.1 has no
``FaultTolerantSyncing``. Code that compares against literal numbers (or
against pyvbox, generated from 6.1) misreads a 7.x machine; the adapter reads
the values from the manager's ``constants`` as it must on real VirtualBox.
``CleanupMode_DetachAllReturnHardDisksAndVMRemovable`` (5) exists from 7.0.6
(the 7.0 profile models a later 7.0 release).
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["PROFILES", "RESULT_CODES", "constants_for", "signed32"]

#: The version profiles the simulator offers, oldest first.
PROFILES = ("6.1", "7.0", "7.1", "7.2")

_STATES_61 = (
    "Null", "PoweredOff", "Saved", "Teleported", "Aborted", "Running", "Paused", "Stuck", "Teleporting",
    "LiveSnapshotting", "Starting", "Stopping", "Saving", "Restoring", "TeleportingPausedVM", "TeleportingIn",
    "DeletingSnapshotOnline", "DeletingSnapshotPaused", "OnlineSnapshotting", "RestoringSnapshot",
    "DeletingSnapshot", "SettingUp", "Snapshotting",
)
_STATES_70 = (
    "Null", "PoweredOff", "Saved", "Teleported", "Aborted", "AbortedSaved", "Running", "Paused", "Stuck",
    "Teleporting", "LiveSnapshotting", "Starting", "Stopping", "Saving", "Restoring", "TeleportingPausedVM",
    "TeleportingIn", "DeletingSnapshotOnline", "DeletingSnapshotPaused", "OnlineSnapshotting",
    "RestoringSnapshot", "DeletingSnapshot", "SettingUp", "Snapshotting",
)

#: VirtualBox's COM result codes (unsigned, as the xidl writes them).
RESULT_CODES: Mapping[str, int] = {
    "VBOX_E_OBJECT_NOT_FOUND": 0x80BB0001,
    "VBOX_E_INVALID_VM_STATE": 0x80BB0002,
    "VBOX_E_VM_ERROR": 0x80BB0003,
    "VBOX_E_FILE_ERROR": 0x80BB0004,
    "VBOX_E_IPRT_ERROR": 0x80BB0005,
    "VBOX_E_PDM_ERROR": 0x80BB0006,
    "VBOX_E_INVALID_OBJECT_STATE": 0x80BB0007,
    "VBOX_E_HOST_ERROR": 0x80BB0008,
    "VBOX_E_NOT_SUPPORTED": 0x80BB0009,
    "VBOX_E_XML_ERROR": 0x80BB000A,
    "VBOX_E_INVALID_SESSION_STATE": 0x80BB000B,
    "VBOX_E_OBJECT_IN_USE": 0x80BB000C,
    "VBOX_E_PASSWORD_INCORRECT": 0x80BB000D,
    "VBOX_E_MAXIMUM_REACHED": 0x80BB000E,
    "VBOX_E_TIMEOUT": 0x80BB0010,
    "E_UNEXPECTED": 0x8000FFFF,
    "E_ACCESSDENIED": 0x80070005,
    "E_INVALIDARG": 0x80070057,
    "E_FAIL": 0x80004005,
    "E_NOTIMPL": 0x80004001,
    "E_ABORT": 0x80004004,
}


def signed32(value: int) -> int:
    """A 32-bit result code as the signed integer XPCOM puts in ``errno``."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def _enum(name: str, members: list[str] | tuple[str, ...], start: int = 0) -> dict[str, int]:
    return {f"{name}_{member}": start + index for index, member in enumerate(members)}


def constants_for(profile: str) -> dict[str, int]:
    """Every constant the simulator serves for ``profile`` (``Enum_Member`` names)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown VirtualBox profile {profile!r}; choose one of {', '.join(PROFILES)}")
    values: dict[str, int] = {}
    states = _enum("MachineState", _STATES_61 if profile == "6.1" else _STATES_70)
    values |= states
    # The range markers name the same states in every version; their numbers follow the shift.
    for marker, state in (("FirstOnline", "Running"), ("LastOnline", "OnlineSnapshotting"),
                          ("FirstTransient", "Teleporting"), ("LastTransient", "Snapshotting")):
        values[f"MachineState_{marker}"] = states[f"MachineState_{state}"]
    values |= _enum("SessionState", ["Null", "Unlocked", "Locked", "Spawning", "Unlocking"])
    values |= _enum("SessionType", ["Null", "WriteLock", "Remote", "Shared"])
    values |= _enum("LockType", ["Null", "Shared", "Write", "VM"])
    values |= _enum("DeviceType", ["Null", "Floppy", "DVD", "HardDisk", "Network", "USB", "SharedFolder", "Graphics3D"])
    values |= _enum("AccessMode", ["ReadOnly", "ReadWrite"], start=1)
    cleanup = ["UnregisterOnly", "DetachAllReturnNone", "DetachAllReturnHardDisksOnly", "Full"]
    if profile != "6.1":
        cleanup.append("DetachAllReturnHardDisksAndVMRemovable")
    values |= _enum("CleanupMode", cleanup, start=1)
    values |= _enum("FirmwareType", ["BIOS", "EFI", "EFI32", "EFI64", "EFIDUAL"], start=1)
    values |= _enum("MediumState", ["NotCreated", "Created", "LockedRead", "LockedWrite", "Inaccessible", "Creating",
                                    "Deleting"])
    values |= _enum("MediumType", ["Normal", "Immutable", "Writethrough", "Shareable", "Readonly", "MultiAttach"])
    values |= {name: signed32(code) for name, code in RESULT_CODES.items()}
    return values
