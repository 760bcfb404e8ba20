"""VirtualBoxHost: vbremote's typed view of a VirtualBox host (the only code that touches vboxapi).

Rules this module keeps:

- Enumeration values come from the connected manager's ``constants``, never
  from literal numbers (``MachineState`` moved by one in 7.0).
- Mutating calls go through a session's ``machine`` (the read-only machine
  refuses them); every session is unlocked in ``finally``; locking retries
  with backoff through the "already locked or being unlocked" window that
  follows a power-off or save-state.
- Progress objects are waited for in short slices, with a deadline; a
  failed progress raises with VirtualBox's text and result code.
- COM errors become :class:`vbremote.VirtualBoxError` subclasses at this
  boundary (:func:`_translated`), raised ``from`` the original.
- Where the API differs between releases, the connected version decides
  (:meth:`VirtualBoxHost._api`): ``openMachine`` has a password argument from
  7.0 (``src/VBox/Main/idl/VirtualBox.xidl``); the NVRAM file is on
  ``IBIOSSettings`` in 6.1 and on ``IMachine.nonVolatileStore`` from 7.0; the
  firmware type moved from ``IMachine`` to ``IMachine.firmwareSettings``
  (``IFirmwareSettings``) in 7.1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from attrs import define, field, frozen

from .._errors import (
    ConfigurationError,
    InvalidVMState,
    SnapshotNotFound,
    VirtualBoxError,
    VirtualBoxOperationFailed,
    VirtualBoxTimeout,
    VirtualBoxUnavailable,
    VMLocked,
    VMNotFound,
)
from .._models import DiskAttachment, MachineState, MediumInfo, Progress, SnapshotInfo, VMInfo

__all__ = ["LockRetry", "VirtualBoxHost"]

log = logging.getLogger("vbremote.virtualbox")

# Result codes (unsigned, from VirtualBox.xidl); compared through the manager's
# xcptIsEqual-like rule, so signed and unsigned errnos both match.
_OBJECT_NOT_FOUND = 0x80BB0001
_INVALID_VM_STATE = 0x80BB0002
_INVALID_OBJECT_STATE = 0x80BB0007
_INVALID_SESSION_STATE = 0x80BB000B

ProgressCallback = Callable[[Progress], None]


@frozen
class LockRetry:
    """How long to retry locking a VM that another session holds or is releasing.

    Attributes:
        total: Give up (``VMLocked``) after this many seconds.
        first: The first pause between attempts; it doubles up to ``longest``.
        longest: The longest pause between attempts.
    """

    total: float = 15.0
    first: float = 0.05
    longest: float = 1.0


def _unsigned(code: int) -> int:
    return code & 0xFFFFFFFF


@define(eq=False)
class VirtualBoxHost:
    """A VirtualBox host, through vboxapi (or anything with its manager surface).

    Make one with :meth:`connect` or :meth:`from_pyvbox`. VMs are named by
    name or uuid (or a :class:`VMInfo`); results are frozen values, never COM
    objects. Methods that wait take ``timeout`` (seconds, ``None`` for no
    limit) and ``on_progress``, called with :class:`Progress` events
    (``done``/``total`` in percent).
    """

    _manager: Any
    _vbox: Any
    lock_retry: LockRetry = LockRetry()
    poll_interval: float = 0.1
    _api_version: tuple[int, int] | None = field(default=None, init=False)

    # -- connecting -----------------------------------------------------------------

    @classmethod
    def connect(cls, *, manager: Any = None, lock_retry: LockRetry = LockRetry()) -> VirtualBoxHost:
        """Connect to VirtualBox.

        Args:
            manager: An object with vboxapi's ``VirtualBoxManager`` surface
                (e.g. :meth:`vbremote.testing.SimulatedVirtualBox.manager`).
                ``None``: import vboxapi and connect to the local VirtualBox.
            lock_retry: How long to retry locking a busy VM.

        Raises:
            VirtualBoxUnavailable: vboxapi is missing, or the VirtualBox service
                could not be reached.
        """
        if manager is None:
            try:
                import vboxapi  # type: ignore[import-not-found]
            except ImportError as exc:
                raise VirtualBoxUnavailable(
                    "VirtualBox's Python bindings (vboxapi) are not importable: install VirtualBox and its SDK "
                    "bindings (on Debian: the virtualbox package; then run 'python vboxapisetup.py install' from "
                    "the SDK's installer folder into this Python environment)"
                ) from exc
            try:
                manager = vboxapi.VirtualBoxManager(None, None)
            except Exception as exc:
                raise VirtualBoxUnavailable(f"the VirtualBox service could not be reached: {exc}") from exc
        try:
            vbox = manager.getVirtualBox()
            if vbox is None:
                raise VirtualBoxUnavailable("the VirtualBox manager returned no VirtualBox object")
            log.debug("connected to VirtualBox %s", vbox.version)
        except VirtualBoxError:
            raise
        except Exception as exc:
            raise VirtualBoxUnavailable(f"the VirtualBox service could not be reached: {exc}") from exc
        return cls(manager, vbox, lock_retry=lock_retry)

    @classmethod
    def from_pyvbox(cls, vbox: Any, *, manager: Any = None, lock_retry: LockRetry = LockRetry()) -> VirtualBoxHost:
        """Use the VirtualBox connection of a pyvbox (``virtualbox`` package) script.

        pyvbox wraps vboxapi's COM objects and reads enumerations with the
        6.1 values it was generated from; vbremote unwraps the COM object and
        reads everything through vboxapi with the live constants.

        Args:
            vbox: A pyvbox ``virtualbox.VirtualBox`` object.
            manager: The vboxapi manager behind it; by default pyvbox's own
                (``virtualbox.Manager().manager``).
            lock_retry: How long to retry locking a busy VM.

        Raises:
            ConfigurationError: ``vbox`` is not a pyvbox VirtualBox object.
            VirtualBoxUnavailable: No manager could be found.
        """
        raw = getattr(vbox, "_i", None)
        if raw is None or not hasattr(raw, "findMachine"):
            raise ConfigurationError(f"{type(vbox).__name__} is not a pyvbox VirtualBox object")
        if manager is None:
            try:
                import virtualbox

                manager = virtualbox.Manager().manager
            except Exception as exc:
                raise VirtualBoxUnavailable(f"pyvbox's vboxapi manager is not available: {exc}") from exc
        return cls(manager, raw, lock_retry=lock_retry)

    # -- reading --------------------------------------------------------------------

    @property
    def version(self) -> str:
        """VirtualBox's version, e.g. ``"7.1.8"``."""
        with self._translated():
            return str(self._vbox.version)

    @property
    def default_machine_folder(self) -> Path:
        """Where VirtualBox puts new VMs (``ISystemProperties.defaultMachineFolder``)."""
        with self._translated():
            return Path(str(self._vbox.systemProperties.defaultMachineFolder))

    def vms(self) -> tuple[VMInfo, ...]:
        """Every registered VM."""
        with self._translated():
            machines = self._manager.getArray(self._vbox, "machines")
            return tuple(self._vm_info(m) for m in machines)

    def vm(self, vm: str | VMInfo) -> VMInfo:
        """One VM, by name or uuid.

        Raises:
            VMNotFound: No registered VM has that name or uuid.
        """
        with self._translated(vm=_key(vm)):
            return self._vm_info(self._find(vm))

    def state(self, vm: str | VMInfo) -> MachineState:
        """A VM's state, read on its own (cheaper than :meth:`vm`).

        Raises:
            VMNotFound: No registered VM has that name or uuid.
        """
        with self._translated(vm=_key(vm)):
            return self._state(self._find(vm).state)

    # -- operations -------------------------------------------------------------------

    def take_snapshot(
        self,
        vm: str | VMInfo,
        name: str,
        *,
        description: str = "",
        live: bool | None = None,
        timeout: float | None = 600.0,
        on_progress: ProgressCallback | None = None,
    ) -> SnapshotInfo:
        """Take a snapshot and wait for it.

        What kind of snapshot VirtualBox takes follows from the VM's state
        (``SessionMachine::takeSnapshot``, src/VBox/Main/src-server/SnapshotImpl.cpp):

        - Running: a live snapshot by default (the guest runs on while its
          state is saved), or a paused one (``live=False``: the VM is paused
          while its state is saved and then resumed);
        - Paused: an online snapshot with a saved state; the VM stays paused;
        - PoweredOff, Aborted: an offline snapshot (no state file);
        - Saved: an offline snapshot that shares the VM's state file.

        Only a Running VM is ever asked for a live snapshot: from VirtualBox
        7.0.10 on, ``takeSnapshot`` with ``fPause = false`` fails with
        ``VBOX_E_INVALID_VM_STATE`` for any other state; the adapter then
        passes ``fPause = true``, as ``VBoxManage snapshot take`` does
        without ``--live``.

        Args:
            vm: The VM.
            name: The snapshot's name.
            description: Its description.
            live: ``None`` (default): live if the VM is Running, else not.
                ``True``: a live snapshot or none (:class:`InvalidVMState`
                unless the VM is Running). ``False``: never live.
            timeout: Seconds to wait. An online snapshot (Running or Paused
                VM) is canceled on expiry; VirtualBox cannot cancel an
                offline one, which goes on (the error says so).
            on_progress: Called with progress events.

        Returns:
            The new snapshot.

        Raises:
            ConfigurationError: No name.
            InvalidVMState: ``live=True`` for a VM that is not Running, or a
                state that allows no snapshot (a transient one).
            VMNotFound, VMLocked, VirtualBoxTimeout, VirtualBoxOperationFailed.

        Once VirtualBox has accepted the request, every exception raised here
        carries the new snapshot's uuid, so the caller can find (and delete)
        what may have been created: a :class:`VirtualBoxError` in its
        ``snapshot_id``, any other exception (``KeyboardInterrupt``, an
        ``on_progress`` callback's own error) as a ``snapshot_id`` attribute
        and a note. An interrupted wait first cancels a cancelable (online)
        snapshot, which VirtualBox then rolls back unless it was past its
        point of no return.
        """
        if not name:
            raise ConfigurationError("a snapshot needs a name")
        key = _key(vm)
        snapshot_id: str | None = None
        try:
            with self._translated(vm=key), self._session(vm, "Shared") as session:
                machine = session.machine
                state = self._state(machine.state)
                if live and state is not MachineState.RUNNING:
                    raise InvalidVMState(
                        f"{key} is {state.value}: a live snapshot needs a Running VM", vm=key, state=state
                    )
                pause = state is not MachineState.RUNNING if live is None else not live
                progress, raw_id = machine.takeSnapshot(name, description, pause)
                snapshot_id = str(raw_id)
                try:
                    self._wait(progress, "take snapshot", key, timeout, on_progress)
                except VirtualBoxError:
                    raise  # finished, failed, or timed out (and canceled where it could be)
                except BaseException:
                    self._cancel(progress)  # Ctrl-C, or the on_progress callback raised
                    raise
                # Read it through a fresh machine object: the session ends with the
                # VM process should the VM die right after the snapshot.
                snapshot = self._find(vm).findSnapshot(snapshot_id)
                return self._snapshot_info(snapshot, parent=_uuid(snapshot.parent), recurse=False)
        except BaseException as exc:
            if snapshot_id is not None:
                _carry_snapshot_id(exc, snapshot_id)
            raise

    def delete_snapshot(
        self,
        vm: str | VMInfo,
        snapshot: str,
        *,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        """Delete a snapshot (merging its differencing images), online if the VM runs.

        VirtualBox refuses up front (:class:`VirtualBoxOperationFailed`,
        result code ``VBOX_E_INVALID_OBJECT_STATE``) a snapshot with more than
        one child snapshot, and the current snapshot when it has a child. A
        disk image of the snapshot with more than one child image (a linked
        clone's, say) fails later, through the progress (``E_FAIL``). Each
        image is merged with its only child: a base image always backward
        (the child into it, so the base keeps its uuid and file), a
        differencing image in the direction VirtualBox finds cheaper
        (``Medium::i_queryPreferredMergeDirection``: into the larger file),
        so which of the two uuids and files survives is VirtualBox's choice.
        The snapshot's saved-state file goes unless the VM or another
        snapshot uses it, and its NVRAM copy goes.

        Args:
            vm: The VM.
            snapshot: The snapshot's uuid (or name).
            timeout: Seconds to wait (a deletion cannot be canceled: on expiry it goes on in VirtualBox).
            on_progress: Called with progress events.

        Raises:
            VMNotFound, SnapshotNotFound, InvalidVMState, VMLocked, VirtualBoxTimeout, VirtualBoxOperationFailed.
        """
        key = _key(vm)
        with self._translated(vm=key), self._session(vm, "Shared") as session:
            found = self._find_snapshot(session.machine, snapshot, key)
            try:
                progress = session.machine.deleteSnapshot(found.id)
            except Exception as exc:
                # VBOX_E_INVALID_OBJECT_STATE here is about the snapshot tree
                # (more than one child, or the current snapshot with a child),
                # not a lock: SessionMachine::i_deleteSnapshot, SnapshotImpl.cpp.
                if self._is_com_error(exc) and self._is(exc, _INVALID_OBJECT_STATE):
                    text = self._message(exc)
                    raise VirtualBoxOperationFailed(
                        f"{key}: VirtualBox refused to delete snapshot {snapshot!r}: {text}",
                        vm=key, result_code=_INVALID_OBJECT_STATE, text=text,
                    ) from exc
                raise
            self._wait(progress, "delete snapshot", key, timeout, on_progress)

    def restore_snapshot(
        self,
        vm: str | VMInfo,
        snapshot: str,
        *,
        timeout: float | None = 600.0,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        """Make a snapshot the VM's current state (the VM must not be running).

        The current differencing images are discarded; an online snapshot
        leaves the VM Saved (sharing the snapshot's state file), an offline
        one PoweredOff; the snapshot's NVRAM copy is copied to the VM's NVRAM
        file, and the VM's last state change becomes the snapshot's time
        (``SessionMachine::i_restoreSnapshotHandler``, SnapshotImpl.cpp).

        Raises:
            VMNotFound, SnapshotNotFound, InvalidVMState, VMLocked, VirtualBoxTimeout, VirtualBoxOperationFailed.
        """
        key = _key(vm)
        with self._translated(vm=key):
            state = self._state(self._find(vm).state)
            if not state.is_off:
                raise InvalidVMState(f"{key} is {state.value}: power it off before restoring a snapshot", vm=key,
                                     state=state)
            with self._session(vm, "Write") as session:
                found = self._find_snapshot(session.machine, snapshot, key)
                progress = session.machine.restoreSnapshot(found)
                self._wait(progress, "restore snapshot", key, timeout, on_progress)

    def start(self, vm: str | VMInfo, *, front_end: str = "headless", timeout: float | None = 300.0) -> None:
        """Power a VM on (or resume it from its saved state).

        Raises:
            VMNotFound, InvalidVMState, VMLocked, VirtualBoxTimeout, VirtualBoxOperationFailed.
        """
        key = _key(vm)
        with self._translated(vm=key):
            machine = self._find(vm)
            session = self._manager.getSessionObject(self._vbox)
            progress = self._retry_locked(key, lambda: machine.launchVMProcess(session, front_end, []))
            try:
                self._wait(progress, "start", key, timeout, None)
            finally:
                self._unlock(session, key)

    def save_state(self, vm: str | VMInfo, *, timeout: float | None = 600.0) -> None:
        """Save a running VM's state (it ends Saved; the RAM is in its state file).

        Raises:
            VMNotFound, InvalidVMState, VMLocked, VirtualBoxTimeout, VirtualBoxOperationFailed.
        """
        key = _key(vm)
        with self._translated(vm=key), self._session(vm, "Shared") as session:
            self._wait(session.machine.saveState(), "save state", key, timeout, None)

    def power_off(self, vm: str | VMInfo, *, timeout: float | None = 120.0) -> None:
        """Power a running or paused VM off (the guest gets no chance to shut down).

        Raises:
            VMNotFound, InvalidVMState, VMLocked, VirtualBoxTimeout, VirtualBoxOperationFailed.
        """
        key = _key(vm)
        with self._translated(vm=key), self._session(vm, "Shared") as session:
            console = session.console
            if console is None:
                state = self._state(session.machine.state)
                raise InvalidVMState(f"{key} is {state.value}, not running: nothing to power off", vm=key,
                                     state=state)
            self._wait(console.powerDown(), "power off", key, timeout, None)

    def pause(self, vm: str | VMInfo) -> None:
        """Pause a running VM (its guest stops; its process and RAM stay).

        Raises:
            VMNotFound, InvalidVMState (not Running), VMLocked, VirtualBoxOperationFailed.
        """
        self._console_call(vm, "pause", "pause")

    def resume(self, vm: str | VMInfo) -> None:
        """Resume a paused VM.

        Raises:
            VMNotFound, InvalidVMState (not Paused), VMLocked, VirtualBoxOperationFailed.
        """
        self._console_call(vm, "resume", "resume")

    def _console_call(self, vm: str | VMInfo, method: str, what: str) -> None:
        key = _key(vm)
        with self._translated(vm=key), self._session(vm, "Shared") as session:
            console = session.console
            if console is None:
                state = self._state(session.machine.state)
                raise InvalidVMState(f"{key} is {state.value}, not running: nothing to {what}", vm=key, state=state)
            getattr(console, method)()

    def set_cpu_portability_level(self, vm: str | VMInfo, level: int) -> None:
        """Set the CPUID portability level (0 to 3; higher hides more host CPU features from the guest).

        A VM that moves between hosts with different CPUs needs a level both
        support. The VM must be powered off.

        Raises:
            ConfigurationError: ``level`` outside 0 to 3.
            VMNotFound, InvalidVMState, VMLocked, VirtualBoxOperationFailed.
        """
        if not isinstance(level, int) or not 0 <= level <= 3:
            raise ConfigurationError(f"the CPU portability level is 0 to 3, not {level!r}")
        key = _key(vm)
        with self._translated(vm=key):
            # A running VM's process holds the write lock: say why at once
            # rather than retrying the lock until the budget runs out.
            state = self._state(self._find(vm).state)
            if state.is_running:
                raise InvalidVMState(f"{key} is {state.value}: power it off to change its CPU settings", vm=key,
                                     state=state)
            with self._session(vm, "Write") as session:
                session.machine.CPUIDPortabilityLevel = level
                session.machine.saveSettings()

    def unregister(self, vm: str | VMInfo) -> Path:
        """Unregister a VM (with its snapshots); its files stay. Returns its settings file.

        Raises:
            VMNotFound, InvalidVMState (running), VMLocked, VirtualBoxOperationFailed.
        """
        key = _key(vm)
        with self._translated(vm=key):
            machine = self._find(vm)
            state = self._state(machine.state)
            if not state.is_off:
                raise InvalidVMState(f"{key} is {state.value}: power it off before unregistering", vm=key,
                                     state=state)
            settings = Path(machine.settingsFilePath)
            mode = self._manager.constants.CleanupMode_DetachAllReturnHardDisksOnly
            media = self._retry_locked(key, lambda: machine.unregister(mode))
            for medium in media or ():
                with contextlib.suppress(Exception):  # already gone with its registry is fine
                    medium.close()
            return settings

    def register(self, settings_file: str | os.PathLike[str], *, password: str = "") -> VMInfo:
        """Register a VM from its settings file (e.g. one restored from an archive).

        Args:
            settings_file: The ``.vbox`` file (made absolute).
            password: The password of an encrypted VM (VirtualBox 7.0 and later).

        Raises:
            VirtualBoxOperationFailed: The file is missing or invalid, or a VM with its uuid is registered.
        """
        path = Path(settings_file).absolute()
        with self._translated(vm=str(path)):
            api = self._api()
            if api is not None and api < (7, 0):
                # 6.1's openMachine(settingsFile) has no password (VirtualBox.xidl, IVirtualBox::openMachine).
                if password:
                    raise ConfigurationError(
                        f"VirtualBox {self.version} does not open encrypted VMs (a password needs 7.0 or later)")
                machine = self._vbox.openMachine(str(path))
            elif api is not None:
                machine = self._vbox.openMachine(str(path), password)
            else:
                machine = self._open_machine_by_arity(str(path), password)
            self._vbox.registerMachine(machine)
            return self._vm_info(self._vbox.findMachine(machine.id))

    def _open_machine_by_arity(self, path: str, password: str) -> Any:
        # An unparsable version string: try 7.0's signature, then 6.1's.
        try:
            return self._vbox.openMachine(path, password)
        except TypeError:
            if password:
                raise ConfigurationError("this VirtualBox version does not open encrypted VMs") from None
            return self._vbox.openMachine(path)

    def _api(self) -> tuple[int, int] | None:
        """The connected VirtualBox's (major, minor), or ``None`` if its version string is unparsable."""
        if self._api_version is None:
            found = re.match(r"\s*(\d+)\.(\d+)", str(self._vbox.version))
            if found is None:
                return None
            self._api_version = (int(found.group(1)), int(found.group(2)))
        return self._api_version

    # -- sessions and progress ------------------------------------------------------

    @contextlib.contextmanager
    def _session(self, vm: str | VMInfo, lock: str) -> Iterator[Any]:
        key = _key(vm)
        machine = self._find(vm)
        session = self._manager.getSessionObject(self._vbox)
        lock_type = getattr(self._manager.constants, f"LockType_{lock}")
        self._retry_locked(key, lambda: machine.lockMachine(session, lock_type))
        try:
            yield session
        finally:
            self._unlock(session, key)

    def _unlock(self, session: Any, key: str) -> None:
        try:
            if session.state == self._manager.constants.SessionState_Locked:
                session.unlockMachine()
        except Exception as exc:
            if not self._is_com_error(exc):
                raise
            log.warning("unlocking the session on %s failed: %s", key, self._message(exc))

    def _retry_locked(self, key: str, call: Callable[[], Any]) -> Any:
        retry = self.lock_retry
        deadline = time.monotonic() + retry.total
        pause = retry.first
        while True:
            try:
                return call()
            except Exception as exc:
                if not self._is_com_error(exc) or not self._is(exc, _INVALID_OBJECT_STATE):
                    raise
                if time.monotonic() + pause > deadline:
                    raise VMLocked(
                        f"{key} stayed locked by another session for {retry.total:g} s: {self._message(exc)}",
                        vm=key, result_code=_INVALID_OBJECT_STATE, text=self._message(exc),
                    ) from exc
                log.debug("%s is locked or being unlocked; retrying in %.2f s", key, pause)
                time.sleep(pause)
                pause = min(pause * 2, retry.longest)

    def _wait(
        self, progress: Any, what: str, key: str, timeout: float | None, on_progress: ProgressCallback | None
    ) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        slice_ms = max(1, int(self.poll_interval * 1000))
        reported = -1
        while not progress.completed:
            progress.waitForCompletion(slice_ms)
            if on_progress is not None:
                reported = int(progress.percent)
                on_progress(Progress(operation=what, path=key, done=reported, total=100))
            if deadline is not None and time.monotonic() > deadline and not progress.completed:
                cancelable = bool(progress.cancelable)
                canceled = self._cancel(progress) if cancelable else False
                if canceled:
                    outcome = " and was canceled"
                elif cancelable:
                    outcome = "; canceling it did not end it in time (it may still finish in VirtualBox)"
                else:
                    outcome = "; VirtualBox cannot cancel it, so it goes on and may still succeed"
                raise VirtualBoxTimeout(f"{what} on {key} did not finish within {timeout:g} s{outcome}", vm=key)
        code = _unsigned(int(progress.resultCode))
        if code == 0 and on_progress is not None and reported != 100:
            # The last event of a finished operation says so (it may have finished between two polls).
            on_progress(Progress(operation=what, path=key, done=100, total=100))
        if code != 0:
            info = progress.errorInfo
            text = str(info.text) if info is not None else ""
            raise VirtualBoxOperationFailed(
                f"{what} on {key} failed: {text or 'no message'} (result code {code:#010x})",
                vm=key, result_code=code, text=text,
            )

    def _cancel(self, progress: Any) -> bool:
        """Cancel a cancelable progress and wait a little for it; whether it ended canceled."""
        try:
            if progress.completed or not progress.cancelable:
                return False
            progress.cancel()
            progress.waitForCompletion(int(max(1.0, 10 * self.poll_interval) * 1000))
            return bool(progress.completed) and bool(progress.canceled)
        except Exception as exc:
            if not self._is_com_error(exc):
                raise
            log.warning("canceling %s failed: %s", progress, self._message(exc))
            return False

    # -- errors -------------------------------------------------------------------------

    def _is_com_error(self, exc: BaseException) -> bool:
        try:
            return bool(self._manager.xcptIsOurXcptKind(exc))
        except Exception:
            return False

    def _is(self, exc: BaseException, code: int) -> bool:
        return bool(self._manager.xcptIsEqual(exc, code))

    def _message(self, exc: BaseException) -> str:
        try:
            return str(self._manager.xcptGetMessage(exc) or exc)
        except Exception:
            return str(exc)

    @contextlib.contextmanager
    def _translated(self, *, vm: str = "") -> Iterator[None]:
        """COM errors in the block become VirtualBoxError subclasses (one table, here)."""
        try:
            yield
        except VirtualBoxError:
            raise
        except Exception as exc:
            if not self._is_com_error(exc):
                raise
            text = self._message(exc)
            code = _unsigned(int(self._manager.xcptGetStatus(exc)))
            table: tuple[tuple[int, type[VirtualBoxError], str], ...] = (
                (_OBJECT_NOT_FOUND, VMNotFound, "not found"),
                (_INVALID_VM_STATE, InvalidVMState, "invalid VM state"),
                (_INVALID_OBJECT_STATE, VMLocked, "locked or busy"),
                (_INVALID_SESSION_STATE, VMLocked, "session busy"),
            )
            for wanted, error, what in table:
                if code == wanted:
                    raise error(f"{vm}: {what}: {text}", vm=vm, result_code=code, text=text) from exc
            raise VirtualBoxOperationFailed(
                f"{vm}: VirtualBox failed: {text} (result code {code:#010x})", vm=vm, result_code=code, text=text
            ) from exc

    # -- reading COM objects into values --------------------------------------------

    def _find(self, vm: str | VMInfo) -> Any:
        key = _key(vm)
        if not key:
            raise ConfigurationError("a VM name or uuid is needed")
        try:
            return self._vbox.findMachine(key)
        except Exception as exc:
            if self._is_com_error(exc) and self._is(exc, _OBJECT_NOT_FOUND):
                raise VMNotFound(f"no registered VM is named or has the uuid {key!r}", vm=key,
                                 result_code=_OBJECT_NOT_FOUND, text=self._message(exc)) from exc
            raise

    def _find_snapshot(self, machine: Any, snapshot: str, key: str) -> Any:
        if not snapshot:
            raise ConfigurationError("a snapshot name or uuid is needed")
        try:
            return machine.findSnapshot(snapshot)
        except Exception as exc:
            if self._is_com_error(exc) and self._is(exc, _OBJECT_NOT_FOUND):
                raise SnapshotNotFound(f"{key} has no snapshot {snapshot!r}", vm=key,
                                       result_code=_OBJECT_NOT_FOUND, text=self._message(exc)) from exc
            raise

    def _state(self, value: int) -> MachineState:
        constants = self._manager.constants
        for state in MachineState:
            if getattr(constants, f"MachineState_{state.value}", None) == value:
                return state
        return MachineState.UNKNOWN

    def _vm_info(self, machine: Any) -> VMInfo:
        c = self._manager.constants
        current = machine.currentSnapshot
        root = None
        if current is not None:
            root = current
            while root.parent is not None:
                root = root.parent
        state_file = str(machine.stateFilePath or "")
        return VMInfo(
            uuid=str(machine.id),
            name=str(machine.name),
            state=self._state(machine.state),
            settings_file=Path(machine.settingsFilePath),
            snapshot_folder=Path(machine.snapshotFolder),
            state_file=Path(state_file) if state_file else None,
            last_state_change=datetime.fromtimestamp(int(machine.lastStateChange) / 1000, tz=UTC),
            nvram_file=self._nvram(machine),
            cpu_portability_level=int(machine.CPUIDPortabilityLevel),
            attachments=self._attachments(self._manager.getArray(machine, "mediumAttachments")),
            snapshot_tree=self._snapshot_info(root, parent=None) if root is not None else None,
            current_snapshot=str(current.id) if current is not None else None,
            locked=machine.sessionState != c.SessionState_Unlocked,
            firmware=self._firmware(machine),
        )

    def _nvram(self, machine: Any) -> Path | None:
        # IBIOSSettings::nonVolatileStorageFile in 6.1; 7.0 moved it to
        # IMachine::nonVolatileStore (INvramStore), where it stays in 7.1 and 7.2.
        api = self._api()
        holders: tuple[str, ...] = ("nonVolatileStore", "BIOSSettings")  # an unparsable version: either
        if api is not None:
            holders = ("BIOSSettings",) if api < (7, 0) else ("nonVolatileStore",)
        for holder in holders:
            try:
                path = str(getattr(machine, holder).nonVolatileStorageFile or "")
            except AttributeError:
                continue
            return Path(path) if path else None
        return None

    def _firmware(self, machine: Any) -> str:
        # IMachine::firmwareType up to 7.0; 7.1 moved it to IMachine::firmwareSettings (IFirmwareSettings).
        api = self._api()
        if api is not None and api >= (7, 1):
            value = machine.firmwareSettings.firmwareType
        elif api is not None:
            value = machine.firmwareType
        else:
            settings = getattr(machine, "firmwareSettings", None)
            value = settings.firmwareType if settings is not None else machine.firmwareType
        names = {number: name for name, number in self._manager.constants.all_values("FirmwareType").items()}
        return str(names.get(value, value))

    def _attachments(self, attachments: list[Any]) -> tuple[DiskAttachment, ...]:
        names = {value: name for name, value in self._manager.constants.all_values("DeviceType").items()}
        out = []
        for attachment in attachments:
            chain: list[MediumInfo] = []
            medium = attachment.medium
            while medium is not None:
                parent = medium.parent
                accessible, error = self._accessibility(medium)
                chain.append(MediumInfo(
                    uuid=str(medium.id),
                    location=Path(medium.location),
                    format=str(medium.format),
                    logical_size=int(medium.logicalSize),
                    parent=str(parent.id) if parent is not None else None,
                    accessible=accessible,
                    access_error=error,
                ))
                medium = parent
            out.append(DiskAttachment(
                controller=str(attachment.controller),
                port=int(attachment.port),
                device=int(attachment.device),
                type=names.get(attachment.type, str(attachment.type)),
                chain=tuple(reversed(chain)),
            ))
        return tuple(sorted(out, key=lambda a: (a.controller, a.port, a.device)))

    def _accessibility(self, medium: Any) -> tuple[bool, str]:
        """Whether VirtualBox can open a medium, and why not.

        A medium loaded from a settings file stays ``Inaccessible`` ("not yet
        checked", with a logical size of 0) until something opens it;
        ``refreshState`` checks it (``Medium::initOne``, ``Medium::refreshState``
        in ``src/VBox/Main/src-server/MediumImpl.cpp``).
        """
        c = self._manager.constants
        usable = (c.MediumState_Created, c.MediumState_LockedRead, c.MediumState_LockedWrite)
        state = medium.state
        if state not in usable:
            state = medium.refreshState()
        if state in usable:
            return True, ""
        return False, str(medium.lastAccessError or "") or "inaccessible"

    def _snapshot_info(self, snapshot: Any, *, parent: str | None, recurse: bool = True) -> SnapshotInfo:
        uuid = str(snapshot.id)
        children = self._manager.getArray(snapshot, "children") if recurse else []
        snapshot_machine = snapshot.machine
        state_file = str(getattr(snapshot_machine, "stateFilePath", "") or "")
        return SnapshotInfo(
            uuid=uuid,
            name=str(snapshot.name),
            description=str(snapshot.description or ""),
            taken=datetime.fromtimestamp(int(snapshot.timeStamp) / 1000, tz=UTC),
            online=bool(snapshot.online),
            state_file=Path(state_file) if state_file else None,
            nvram_file=self._nvram(snapshot_machine),
            attachments=self._attachments(self._manager.getArray(snapshot_machine, "mediumAttachments")),
            parent=parent,
            children=tuple(self._snapshot_info(child, parent=uuid) for child in children),
        )


def _key(vm: str | VMInfo) -> str:
    return vm.uuid if isinstance(vm, VMInfo) else str(vm)


def _carry_snapshot_id(exc: BaseException, snapshot_id: str) -> None:
    """Let an exception out of take_snapshot say which snapshot VirtualBox was asked for."""
    if isinstance(exc, VirtualBoxError):
        exc.snapshot_id = snapshot_id
    else:
        with contextlib.suppress(AttributeError, TypeError):
            exc.snapshot_id = snapshot_id  # type: ignore[attr-defined]
    exc.add_note(f"VirtualBox snapshot {snapshot_id} was requested; it may exist (look it up, delete it if unwanted)")


def _uuid(snapshot: Any) -> str | None:
    return str(snapshot.id) if snapshot is not None else None
