"""The vboxapi surface of the simulated VirtualBox.

``VirtualBoxManager`` has vboxapi's methods (``getVirtualBox``,
``getSessionObject``, ``getArray``, the ``xcpt*`` helpers) and a ``constants``
object with the profile's values. The COM-style objects have VirtualBox's
attribute and method names and argument orders; as with XPCOM, attributes
read as ``obj.name`` and as ``obj.getName()``, out-parameters come back as a
tuple after the return value (``progress, id = machine.takeSnapshot(...)``),
and failures raise an exception whose ``errno`` is the signed 32-bit result
code and whose ``msg`` is VirtualBox's text.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path
from typing import Any

from ._constants import RESULT_CODES, signed32
from ._media import check_medium
from ._model import SimulatedVBoxError, _Attachment, _Machine, _Session, _Snapshot
from ._operations import Operation
from ._sessions import check_open
from ._world import World

__all__ = ["VirtualBoxManager"]


class _COM:
    """Gives every attribute its XPCOM getter and setter (``getName()``, ``setName(v)``)."""

    def __getattr__(self, name: str) -> Any:
        for prefix in ("get", "set"):
            if name.startswith(prefix) and len(name) > 3:
                stem = name[3:]
                for candidate in (stem, stem[0].lower() + stem[1:]):
                    if isinstance(getattr(type(self), candidate, None), property):
                        if prefix == "get":
                            return lambda: getattr(self, candidate)
                        return lambda value: setattr(self, candidate, value)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._identity() == self._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    def _identity(self) -> object:
        return id(self)


class _Constants:
    """``mgr.constants``: ``Enum_Member`` attributes, as vboxapi's reflection object."""

    def __init__(self, values: dict[str, int]) -> None:
        self._values = dict(values)

    def __getattr__(self, name: str) -> int:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"Attribute {name} not found") from None

    def all_values(self, enum_name: str) -> dict[str, int]:
        """Every member of one enumeration, by name."""
        prefix = enum_name + "_"
        return {k[len(prefix) :]: v for k, v in self._values.items() if k.startswith(prefix)}


class _Statuses:
    def __init__(self) -> None:
        for name, code in RESULT_CODES.items():
            setattr(self, name, signed32(code))
        self.S_OK = 0


class _IErrorInfo(_COM):
    def __init__(self, error: SimulatedVBoxError) -> None:
        self._error = error

    resultCode = property(lambda self: self._error.errno)
    resultDetail = property(lambda self: 0)
    text = property(lambda self: self._error.msg)
    component = property(lambda self: "SessionMachine")
    interfaceID = property(lambda self: "")
    next = property(lambda self: None)


class _IProgress(_COM):
    def __init__(self, op: Operation, sim: World) -> None:
        self._op = op
        self._sim = sim
        self._timeout = -1

    description = property(lambda self: self._op.description)
    operationDescription = property(lambda self: self._op.description)
    cancelable = property(lambda self: self._op.cancelable)
    completed = property(lambda self: self._op.done.is_set())
    canceled = property(lambda self: self._op.canceled)
    percent = property(lambda self: self._op.percent)
    operationCount = property(lambda self: 1)
    operation = property(lambda self: 0)

    @property
    def timeRemaining(self) -> int:
        return 0 if self._op.done.is_set() else -1

    @property
    def timeout(self) -> int:
        return self._timeout

    @timeout.setter
    def timeout(self, value: int) -> None:
        self._timeout = int(value)

    @property
    def resultCode(self) -> int:
        if not self._op.done.is_set():
            raise SimulatedVBoxError("E_FAIL", "Result code is not available, operation is still in progress")
        return self._op.error.errno if self._op.error else 0

    @property
    def errorInfo(self) -> _IErrorInfo | None:
        if not self._op.done.is_set():
            raise SimulatedVBoxError("E_FAIL", "Error info is not available, operation is still in progress")
        return _IErrorInfo(self._op.error) if self._op.error else None

    def waitForCompletion(self, timeout: int) -> None:
        self._op.done.wait(None if timeout < 0 else timeout / 1000)

    def waitForOperationCompletion(self, operation: int, timeout: int) -> None:
        self.waitForCompletion(timeout)

    def cancel(self) -> None:
        if not self._op.cancelable:
            raise SimulatedVBoxError("VBOX_E_INVALID_OBJECT_STATE", "Operation cannot be canceled")
        self._op.cancel_requested.set()


class _IMedium(_COM):
    def __init__(self, machine: _Machine, uuid: str) -> None:
        self._machine = machine
        self._uuid = uuid

    def _identity(self) -> object:
        return self._uuid

    def _record(self) -> Any:
        found = self._machine.media.get(self._uuid) or self._machine.removable.get(self._uuid)
        if found is None:
            raise SimulatedVBoxError("E_ACCESSDENIED", "The object is not ready")
        return found

    id = property(lambda self: self._uuid)
    location = property(lambda self: str(self._record().path))
    name = property(lambda self: self._record().path.name)
    # DVD and floppy images are opened with the RAW backend and are read-only (Medium::init for
    # DeviceType_DVD / DeviceType_Floppy, MediumImpl.cpp).
    format = property(lambda self: "VDI" if self._record().kind == "HardDisk" else "RAW")
    deviceType = property(lambda self: {"Floppy": 1, "DVD": 2}.get(self._record().kind, 3))
    type = property(lambda self: 0 if self._record().kind == "HardDisk" else 4)  # Normal, Readonly
    readOnly = property(lambda self: self._record().kind != "HardDisk" or bool(self._record().children))

    # Medium::getState, getLogicalSize, getSize and getLastAccessError read what the
    # last check found: a medium read from settings is Inaccessible with sizes 0 until
    # refreshState (or a VM start) opens it (Medium::initOne, MediumImpl.cpp).

    @property
    def logicalSize(self) -> int:
        record = self._record()
        return record.size if record.accessible else 0

    @property
    def size(self) -> int:
        record = self._record()
        return record.path.stat().st_size if record.accessible and record.path.exists() else 0

    @property
    def lastAccessError(self) -> str:
        return str(self._record().access_error)

    def refreshState(self) -> int:
        record = self._record()
        check_medium(record)
        return 1 if record.accessible else 4

    @property
    def parent(self) -> _IMedium | None:
        parent = self._record().parent
        return _IMedium(self._machine, parent) if parent else None

    @property
    def base(self) -> _IMedium:
        uuid: str | None = self._uuid
        while uuid is not None:
            base, uuid = uuid, self._machine.media[uuid].parent
        return _IMedium(self._machine, base)

    @property
    def children(self) -> list[_IMedium]:
        return [_IMedium(self._machine, c) for c in self._record().children]

    @property
    def state(self) -> int:
        return 1 if self._record().accessible else 4

    def close(self) -> None:
        if self._machine.registered and (self._uuid in self._machine.media or self._uuid in self._machine.removable):
            raise SimulatedVBoxError(
                "VBOX_E_OBJECT_IN_USE", f"Medium '{self._record().path}' cannot be closed because it is still attached"
            )


class _IMediumAttachment(_COM):
    def __init__(self, sim: World, machine: _Machine, attachment: _Attachment) -> None:
        self._sim = sim
        self._machine = machine
        self._a = attachment

    controller = property(lambda self: self._a.controller)
    port = property(lambda self: self._a.port)
    device = property(lambda self: self._a.device)
    passthrough = property(lambda self: False)
    hotPluggable = property(lambda self: False)

    @property
    def type(self) -> int:
        return self._sim.constants[f"DeviceType_{self._a.type}"]

    @property
    def medium(self) -> _IMedium | None:
        return _IMedium(self._machine, self._a.medium) if self._a.medium else None


class _ISnapshotMachine(_COM):
    """``ISnapshot.machine``: the read-only machine as it was at the snapshot."""

    def __init__(self, sim: World, machine: _Machine, snapshot: _Snapshot) -> None:
        self._sim = sim
        self._machine = machine
        self._snapshot = snapshot

    id = property(lambda self: self._machine.uuid)
    name = property(lambda self: self._machine.name)

    @property
    def stateFilePath(self) -> str:
        state_file = self._snapshot.state_file
        return str(self._machine.path(state_file)) if state_file else ""

    @property
    def mediumAttachments(self) -> list[_IMediumAttachment]:
        return [_IMediumAttachment(self._sim, self._machine, a) for a in self._snapshot.attachments]

    @property
    def BIOSSettings(self) -> _IBIOSSettings:
        if self._sim.profile not in ("6.1", "7.0"):
            raise AttributeError("BIOSSettings moved to IMachine.firmwareSettings in 7.1")
        if self._sim.profile == "7.0":
            return _IBIOSSettings()
        return _IBIOSSettings61(self._machine.path(self._snapshot.nvram) if self._snapshot.nvram else None)

    @property
    def nonVolatileStore(self) -> _INvramStore:
        if self._sim.profile == "6.1":
            raise AttributeError("IMachine.nonVolatileStore exists from VirtualBox 7.0 on")
        # A snapshot machine has no default NVRAM file (Machine::i_getDefaultNVRAMFilename).
        return _INvramStore(self._machine.path(self._snapshot.nvram) if self._snapshot.nvram else None)


class _ISnapshot(_COM):
    def __init__(self, sim: World, machine: _Machine, snapshot: _Snapshot) -> None:
        self._sim = sim
        self._machine = machine
        self._s = snapshot

    def _identity(self) -> object:
        return self._s.uuid

    id = property(lambda self: self._s.uuid)
    name = property(lambda self: self._s.name)
    description = property(lambda self: self._s.description)
    timeStamp = property(lambda self: self._s.time_ms)
    online = property(lambda self: self._s.state_file is not None)
    childrenCount = property(lambda self: len(self._s.children))

    @property
    def machine(self) -> _ISnapshotMachine:
        return _ISnapshotMachine(self._sim, self._machine, self._s)

    @property
    def parent(self) -> _ISnapshot | None:
        parent = self._s.parent
        return _ISnapshot(self._sim, self._machine, self._machine.snapshots[parent]) if parent else None

    @property
    def children(self) -> list[_ISnapshot]:
        return [_ISnapshot(self._sim, self._machine, self._machine.snapshots[c]) for c in self._s.children]


# Where the firmware type and the NVRAM file are (src/VBox/Main/idl/VirtualBox.xidl):
# 6.1.38  IMachine.firmwareType, IMachine.BIOSSettings.nonVolatileStorageFile;
# 7.0.x   IMachine.firmwareType, IMachine.nonVolatileStore (INvramStore), IBIOSSettings without it;
# 7.1/7.2 IMachine.firmwareSettings.firmwareType (IFirmwareSettings), IMachine.platform (IPlatform),
#         IMachine.nonVolatileStore; IMachine has no firmwareType or BIOSSettings.


class _INvramStore(_COM):
    """``INvramStore`` (7.x) or, for its ``nonVolatileStorageFile``, 6.1's ``IBIOSSettings``."""

    def __init__(self, path: Path | None) -> None:
        self._path = path

    @property
    def nonVolatileStorageFile(self) -> str:
        return str(self._path) if self._path else ""


class _IBIOSSettings(_COM):
    """7.0's IBIOSSettings (the NVRAM file moved to IMachine.nonVolatileStore)."""

    ACPIEnabled = property(lambda self: True)
    IOAPICEnabled = property(lambda self: True)


class _IBIOSSettings61(_IBIOSSettings, _INvramStore):
    """6.1's IBIOSSettings, which names the NVRAM file."""


class _IFirmwareSettings(_COM):
    def __init__(self, sim: World, machine: _Machine) -> None:
        self._sim = sim
        self._machine = machine

    @property
    def firmwareType(self) -> int:
        return self._sim.constants[f"FirmwareType_{self._machine.firmware}"]

    ACPIEnabled = property(lambda self: True)
    IOAPICEnabled = property(lambda self: True)


class _IPlatform(_COM):
    architecture = property(lambda self: 1)  # PlatformArchitecture_x86
    chipsetType = property(lambda self: 1)  # ChipsetType_PIIX3


class _IConsole(_COM):
    def __init__(self, sim: World, machine: _Machine, session: _Session) -> None:
        self._sim = sim
        self._machine = machine
        self._session = session

    @property
    def machine(self) -> _IMachine:
        return _IMachine(self._sim, self._machine, self._session)

    @property
    def state(self) -> int:
        return self._sim.state_value(self._machine)

    def powerDown(self) -> _IProgress:
        self._sim.check_session_machine(self._machine, self._session)
        return _IProgress(self._sim.power_down(self._machine), self._sim)

    def pause(self) -> None:
        self._sim.pause(self._machine, True)

    def resume(self) -> None:
        self._sim.pause(self._machine, False)


class _IMachine(_COM):
    """``IMachine``: the read-only machine (``session`` None) or a session's mutable machine."""

    def __init__(self, sim: World, machine: _Machine, session: _Session | None = None) -> None:
        self._sim = sim
        self._m = machine
        self._session = session

    def _identity(self) -> object:
        return (self._m.uuid, self._session is not None)

    def _mutable(self) -> None:
        if self._session is None:
            # IMachine from findMachine: VirtualBox implements these only on the session machine.
            raise SimulatedVBoxError("E_NOTIMPL", "Not implemented on the read-only machine; lock a session")
        self._sim.check_session_machine(self._m, self._session)

    def _state_dependent(self, what: str) -> None:
        # Machine::saveState and Machine::discardSavedState (MachineImpl.cpp) on the
        # read-only machine: i_checkStateDependency fails for a registered machine
        # that is not the session machine; an unregistered one ends in E_NOTIMPL.
        if self._session is None:
            if self._m.registered:
                message = f"The machine is not {what} (state is {self._m.state})"
                raise SimulatedVBoxError("VBOX_E_INVALID_VM_STATE", message)
            raise SimulatedVBoxError("E_NOTIMPL", "Not implemented on the read-only machine; lock a session")
        self._sim.check_session_machine(self._m, self._session)

    # -- attributes ---------------------------------------------------------------

    id = property(lambda self: self._m.uuid)
    name = property(lambda self: self._m.name)
    accessible = property(lambda self: True)
    OSTypeId = property(lambda self: self._m.os_type)
    memorySize = property(lambda self: self._m.memory_mb)
    settingsFilePath = property(lambda self: str(self._m.settings_path))
    snapshotFolder = property(lambda self: str(self._m.folder / "Snapshots"))
    snapshotCount = property(lambda self: len(self._m.snapshots))
    settingsModified = property(lambda self: self._m.pending_cpuid is not None)

    @property
    def lastStateChange(self) -> int:
        stamp = self._m.last_state_change
        if not stamp:
            return 0
        parsed = dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
        return int(parsed.timestamp() * 1000)

    @property
    def state(self) -> int:
        return self._sim.state_value(self._m)

    @property
    def sessionState(self) -> int:
        if self._m.holder is not None:
            return self._sim.constants["SessionState_Locked"]
        if self._sim.is_locked(self._m):
            return self._sim.constants["SessionState_Unlocking"]
        return self._sim.constants["SessionState_Unlocked"]

    @property
    def stateFilePath(self) -> str:
        return str(self._m.path(self._m.state_file)) if self._m.state_file else ""

    @property
    def currentSnapshot(self) -> _ISnapshot | None:
        current = self._m.current
        return _ISnapshot(self._sim, self._m, self._m.snapshots[current]) if current else None

    @property
    def mediumAttachments(self) -> list[_IMediumAttachment]:
        return [_IMediumAttachment(self._sim, self._m, a) for a in self._m.attachments]

    @property
    def firmwareType(self) -> int:
        if self._sim.profile not in ("6.1", "7.0"):
            raise AttributeError("IMachine.firmwareType moved to IMachine.firmwareSettings in 7.1")
        return self._sim.constants[f"FirmwareType_{self._m.firmware}"]

    @property
    def firmwareSettings(self) -> _IFirmwareSettings:
        if self._sim.profile in ("6.1", "7.0"):
            raise AttributeError("IMachine.firmwareSettings exists from VirtualBox 7.1 on")
        return _IFirmwareSettings(self._sim, self._m)

    @property
    def platform(self) -> _IPlatform:
        if self._sim.profile in ("6.1", "7.0"):
            raise AttributeError("IMachine.platform exists from VirtualBox 7.1 on")
        return _IPlatform()

    @property
    def CPUIDPortabilityLevel(self) -> int:
        if self._session is not None and self._m.pending_cpuid is not None:
            return self._m.pending_cpuid
        return self._m.cpuid_level

    @CPUIDPortabilityLevel.setter
    def CPUIDPortabilityLevel(self, value: int) -> None:
        self._sim.set_cpuid_level(self._m, self._session, int(value))

    @property
    def BIOSSettings(self) -> _IBIOSSettings:
        if self._sim.profile not in ("6.1", "7.0"):
            raise AttributeError("BIOSSettings moved to IMachine.firmwareSettings in 7.1")
        return _IBIOSSettings61(self._nvram_path()) if self._sim.profile == "6.1" else _IBIOSSettings()

    def _nvram_path(self) -> Path | None:
        relative = self._sim.nvram_file(self._m)
        return self._m.path(relative) if relative else None

    def _nvram_store(self) -> _INvramStore:
        return _INvramStore(self._nvram_path())

    @property
    def nonVolatileStore(self) -> _INvramStore:
        if self._sim.profile == "6.1":
            raise AttributeError("IMachine.nonVolatileStore exists from VirtualBox 7.0 on")
        return self._nvram_store()

    # -- methods --------------------------------------------------------------------

    def lockMachine(self, session: _ISession, lockType: int) -> None:
        names = {v: k for k, v in self._sim.constants.items() if k.startswith("LockType_")}
        kind = names.get(lockType, "")
        if kind not in ("LockType_Shared", "LockType_Write", "LockType_VM"):
            raise SimulatedVBoxError("E_INVALIDARG", f"Invalid lock type {lockType}")
        self._sim.lock_machine(self._m, session._s, kind.removeprefix("LockType_"))

    def launchVMProcess(self, session: _ISession, name: str, environmentChanges: list[str]) -> _IProgress:
        if name not in ("headless", "gui", "sdl", "separate", ""):
            raise SimulatedVBoxError("E_INVALIDARG", f"Invalid session type: '{name}'")
        op = self._sim.launch(self._m, session._s, workload=self._sim.default_workload)
        return _IProgress(op, self._sim)

    def findSnapshot(self, nameOrId: str) -> _ISnapshot:
        return _ISnapshot(self._sim, self._m, self._sim.find_snapshot(self._m, nameOrId or ""))

    def takeSnapshot(self, name: str, description: str, pause: bool) -> tuple[_IProgress, str]:
        self._mutable()
        op, snapshot_id = self._sim.take_snapshot(self._m, name, description, bool(pause))
        return _IProgress(op, self._sim), snapshot_id

    def deleteSnapshot(self, id: str) -> _IProgress:
        self._mutable()
        return _IProgress(self._sim.delete_snapshot(self._m, id), self._sim)

    def restoreSnapshot(self, snapshot: _ISnapshot) -> _IProgress:
        self._mutable()
        return _IProgress(self._sim.restore_snapshot(self._m, snapshot._s), self._sim)

    def saveState(self) -> _IProgress:
        self._state_dependent("mutable")
        return _IProgress(self._sim.save_state(self._m), self._sim)

    def discardSavedState(self, fRemoveFile: bool) -> None:
        self._state_dependent("mutable or saved")
        self._sim.discard_saved_state(self._m, bool(fRemoveFile))

    def saveSettings(self) -> None:
        self._sim.save_settings(self._m, self._session)

    def discardSettings(self) -> None:
        self._m.pending_cpuid = None

    def unregister(self, cleanupMode: int) -> list[_IMedium]:
        if self._session is not None:
            raise SimulatedVBoxError("E_NOTIMPL", "Unregister the machine through IVirtualBox's machine object")
        names = {v: k for k, v in self._sim.constants.items() if k.startswith("CleanupMode_")}
        mode = names.get(cleanupMode, "").removeprefix("CleanupMode_")
        if not mode:
            raise SimulatedVBoxError("E_INVALIDARG", f"Invalid cleanup mode {cleanupMode}")
        return [_IMedium(self._m, uuid) for uuid in self._sim.unregister(self._m, mode)]


class _ISession(_COM):
    def __init__(self, sim: World) -> None:
        self._sim = sim
        self._s = _Session()

    @property
    def state(self) -> int:
        return self._sim.constants[f"SessionState_{self._s.state}"]

    # Session::getType, getMachine and getConsole: E_UNEXPECTED unless locked (CHECK_OPEN, SessionImpl.cpp).

    @property
    def type(self) -> int:
        with self._sim.lock:
            check_open(self._s)
            return self._sim.constants[f"SessionType_{self._s.type}"]

    @property
    def machine(self) -> _IMachine:
        with self._sim.lock:
            check_open(self._s)
            assert self._s.machine is not None
            return _IMachine(self._sim, self._s.machine, self._s)

    @property
    def console(self) -> _IConsole | None:
        with self._sim.lock:
            check_open(self._s)
            machine = self._s.machine
            assert machine is not None
            return _IConsole(self._sim, machine, self._s) if self._s.console else None

    def unlockMachine(self) -> None:
        self._sim.unlock(self._s)


class _ISystemProperties(_COM):
    """``ISystemProperties``: the default machine folder is ``<home>/VirtualBox VMs``
    (SystemProperties::i_getDefaultMachineFolder, SystemPropertiesImpl.cpp)."""

    def __init__(self, sim: World) -> None:
        self._sim = sim

    defaultMachineFolder = property(lambda self: str(self._sim.vms_folder))


class _IVirtualBox(_COM):
    def __init__(self, sim: World) -> None:
        self._sim = sim

    version = property(lambda self: self._sim.version)
    versionNormalized = property(lambda self: self._sim.version)
    revision = property(lambda self: 160000)
    APIVersion = property(lambda self: self._sim.profile.replace(".", "_"))
    homeFolder = property(lambda self: str(self._sim.home))
    settingsFilePath = property(lambda self: str(self._sim.home / "VirtualBox.xml"))
    systemProperties = property(lambda self: _ISystemProperties(self._sim))

    @property
    def machines(self) -> list[_IMachine]:
        with self._sim.lock:
            return [_IMachine(self._sim, m) for m in self._sim.machines.values()]

    def findMachine(self, nameOrId: str) -> _IMachine:
        wanted = nameOrId.strip("{}").lower()
        with self._sim.lock:
            for machine in self._sim.machines.values():
                if machine.uuid == wanted or machine.name == nameOrId:
                    return _IMachine(self._sim, machine)
        raise SimulatedVBoxError("VBOX_E_OBJECT_NOT_FOUND", f"Could not find a registered machine named '{nameOrId}'")

    def openMachine(self, settingsFile: str, *password: str) -> _IMachine:
        # 7.0 added the password argument (for encrypted VMs); 6.1 has none.
        expected = 0 if self._sim.profile == "6.1" else 1
        if len(password) != expected:
            raise TypeError(f"openMachine takes {1 + expected} arguments on VirtualBox {self._sim.version}")
        return _IMachine(self._sim, self._sim.open_machine(settingsFile))

    def registerMachine(self, machine: _IMachine) -> None:
        self._sim.register(machine._m)


class VirtualBoxManager:
    """The simulator's ``vboxapi.VirtualBoxManager``.

    Made by :meth:`SimulatedVirtualBox.manager`. Offers what vboxapi's manager
    offers to API clients: ``constants``, ``statuses``, ``vbox``,
    ``getVirtualBox()``, ``getSessionObject()``, ``getArray()``,
    ``xcptGetStatus()``, ``xcptIsOurXcptKind()``, ``xcptIsEqual()``,
    ``xcptGetMessage()``, ``xcptToString()``, ``waitForEvents()``.
    """

    def __init__(self, sStyle: str | None = None, dPlatformParams: object = None, *,
                 simulator: World) -> None:
        self._sim = simulator
        self.style = sStyle or "XPCOM"
        self.type = self.style
        self.remote = False
        self.constants = _Constants(simulator.constants)
        self.statuses = _Statuses()
        self.oXcptClass = SimulatedVBoxError
        self.vbox = _IVirtualBox(simulator)

    @property
    def mgr(self) -> VirtualBoxManager:
        return self

    def getPythonApiRevision(self) -> int:
        return 3

    def getVirtualBox(self) -> _IVirtualBox:
        return self.vbox

    def getSessionObject(self, oIVBox: object = None) -> _ISession:
        return _ISession(self._sim)

    def getArray(self, oInterface: object, sAttrib: str) -> list[Any]:
        return list(getattr(oInterface, sAttrib))

    def waitForEvents(self, cMsTimeout: int) -> int:
        time.sleep(max(0, cMsTimeout) / 1000)
        return 1

    def deinit(self) -> bool:
        return True

    def getBinDir(self) -> str:
        return os.fspath(self._sim.home)

    def xcptGetStatus(self, oXcpt: BaseException | None = None) -> int:
        return int(getattr(oXcpt, "errno", 0))

    def xcptIsOurXcptKind(self, oXcpt: BaseException | None = None) -> bool:
        return isinstance(oXcpt, SimulatedVBoxError)

    def xcptIsDeadInterface(self, oXcpt: BaseException | None = None) -> bool:
        return self.xcptGetStatus(oXcpt) in (signed32(0x80004004), signed32(0x800706BE))

    def xcptIsEqual(self, oXcpt: BaseException | None, hrStatus: int) -> bool:
        # Like vboxapi: a status given unsigned equals the signed errno it stands for.
        status = getattr(oXcpt, "errno", None)
        return status is not None and signed32(status) == signed32(hrStatus)

    def xcptIsNotEqual(self, oXcpt: BaseException | None, hrStatus: int) -> bool:
        return not self.xcptIsEqual(oXcpt, hrStatus)

    def xcptGetMessage(self, oXcpt: BaseException | None = None) -> str | None:
        message = getattr(oXcpt, "msg", None)
        return message or None

    def xcptToString(self, hrStatusOrXcpt: BaseException | int | None = None) -> str:
        status = self.xcptGetStatus(hrStatusOrXcpt) if isinstance(hrStatusOrXcpt, BaseException) else hrStatusOrXcpt
        for name, code in RESULT_CODES.items():
            if signed32(code) == signed32(int(status or 0)):
                return name
        return f"{int(status or 0) & 0xFFFFFFFF:#x}"
