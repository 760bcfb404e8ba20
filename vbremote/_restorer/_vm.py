"""The Restorer: a VM back from an archive, in place, into another folder or host, or as a new VM.

Around the data path (plan, apply, journal, verify) it adds what concerns
the VM:

- **Preflight** (:meth:`Restorer.plan`): the findings that stop a restore,
  each with what to do, before anything is written.
- **Unregister first.** The old VM is unregistered before the first write, so
  a half-restored VM is never registered and cannot be started (VirtualBox
  keeps a registered machine's settings and media open, and would start it
  from whatever the files hold). The settings file is written, atomically,
  only once the data is verified, then registered and checked.
- **Locks.** A restore holds the per-VM lock that snapshot runs hold (the
  archive's VM uuid), and a lock of the target folder, for its whole length:
  it never rewrites disks a snapshot run is reading, and two restores never
  share a target (nor its journal).
- **Stale files.** An in-place restore removes the files that the old VM's
  settings named (disks, differencing images, saved states, NVRAM files)
  and the archive does not contain, and nothing else. Their list is made and
  persisted in the target before anything changes, so a restore killed after
  the old settings were replaced still removes them when it is run again.
- **Missing DVD and floppy images.** An archive refers to them, never holds
  them; one missing on this host stops the restore before any write
  (``image-missing``), or with ``eject_missing_images`` its drives are
  restored empty and reported (see :mod:`._images`).
- **A new VM** (``as_new``): new machine and medium uuids, written in the
  settings and in every VDI header, and a new name, so an old snapshot opens
  beside the current VM.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import posixpath
import re
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
from attrs import define, frozen

from .._errors import (
    ArchiveInvalid,
    ArchiveNotFound,
    ConfigurationError,
    RestoreError,
    RestoreLocked,
    RestorePreflightFailed,
    SettingsFileError,
    SnapshotInProgress,
    TargetSpaceError,
    VMNotFound,
)
from .._hostinfo import cpu_vendor
from .._models import ArchiveInfo, FileRole, MachineState, Progress, SnapshotMode, VMInfo
from .._settings import parse_settings, relocate
from .._snapshotter._lock import check_lock_wait, state_dir_or_default, vm_lock
from ._apply import ApplyStats, Prefetch, Verify, apply_plan
from ._checks import source_host_references
from ._foreign import foreign_source
from ._images import ImageDrive, image_drives, missing_images
from ._journal import JOURNAL_NAME, replace_durably
from ._plan import PlanProblem, RestorePlan, make_plan
from ._rewrite import eject_images, new_identity, set_vdi_uuids, settings_with
from ._source import RestoreSource, referenced_files, source_from_archive
from ._stale import (
    STALE_PREFIX,
    forget_stale,
    is_regular_inside,
    load_stale,
    remove_stale,
    save_stale,
    stale_name,
    vm_key,
)

if TYPE_CHECKING:
    from .._repository import Repository
    from .._vbox import VirtualBoxHost

__all__ = ["RestoreResult", "Restorer"]

log = logging.getLogger("vbremote.restore")

_VERSION = re.compile(r"(\d+)\.(\d+)")
_VM_NAME = re.compile(r"[^/\\\0]{1,200}")


# The characters VirtualBox keeps in a machine's folder and file names; every other
# character becomes "_", one per byte of its UTF-8 form (sanitiseMachineFilename in
# src/VBox/Main/src-server/VirtualBoxImpl.cpp, 7.1.12: RTStrPurgeComplementSet over these ranges).
_FOLDER_NAME_RANGES = (
    (0x20, 0x20), (0x28, 0x29), (0x2D, 0x2E), (0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A), (0x5F, 0x5F),
    (0xA0, 0xD7AF),
)


def machine_folder_name(name: str) -> str:
    """The folder name VirtualBox gives a new machine called ``name`` (never a path: no separators, no ``..``).

    As ``VirtualBox::composeMachineFilename`` does: characters outside a safe
    set become ``_`` (one per UTF-8 byte), then a leading dot or dash, a
    trailing dot and leading and trailing spaces become ``_`` too.
    """
    chars = [
        c if any(lo <= ord(c) <= hi for lo, hi in _FOLDER_NAME_RANGES) else "_" * len(c.encode("utf-8", "replace"))
        for c in name
    ]
    folder = "".join(chars)
    if not folder:
        return folder
    if folder[0] in ".-":
        folder = "_" + folder[1:]
    if folder[-1] == ".":
        folder = folder[:-1] + "_"
    stripped = folder.lstrip(" ")
    folder = "_" * (len(folder) - len(stripped)) + stripped
    stripped = folder.rstrip(" ")
    return stripped + "_" * (len(folder) - len(stripped))


def _no_reserved_names(source: RestoreSource) -> RestoreSource:
    """``source``, unless it would write one of the restore's own files (the journal, a stale-file record).

    Raises:
        ArchiveInvalid: It would; such a file is the restore's to write and to trust.
    """
    for f in source.files:
        name = f.target_path
        if name in (JOURNAL_NAME, JOURNAL_NAME + ".tmp") or name.startswith(STALE_PREFIX):
            raise ArchiveInvalid(
                f"archive {source.archive!r} holds {name!r}, a name a restore keeps for its own records "
                "(the journal, the list of stale files); refused", archive=source.archive, path=name)
    return source


def _saved(source: RestoreSource) -> bool:
    """Whether the archived machine is in a saved state: its settings name a state file.

    Online and migrate archives always are; an offline archive of a VM that
    was Saved is too (the Snapshotter archives it as it is). VirtualBox
    registers a machine Saved exactly when its settings have a ``stateFile``
    (``Machine::i_loadMachineDataFromSettings``, MachineImpl.cpp).
    """
    return bool(parse_settings(source.settings).state_file) or source.mode is not SnapshotMode.OFFLINE


def _without_machine_state(source: RestoreSource) -> RestoreSource:
    """``source`` without the machine's own saved-state file (a state that is discarded is not restored).

    A user snapshot's saved state stays, even where it is the same file.
    """
    settings = parse_settings(source.settings)
    if not settings.state_file:
        return source
    state = posixpath.normpath(settings.state_file)
    kept = {posixpath.normpath(node.state_file) for node in settings.snapshots() if node.state_file}
    if state in kept:
        return source
    files = tuple(f for f in source.files
                  if not (f.role is FileRole.STATE and posixpath.normpath(f.target_path) == state))
    return attrs.evolve(source, files=files)


def _major_minor(version: str | None) -> tuple[int, int] | None:
    match = _VERSION.match(version or "")
    return (int(match[1]), int(match[2])) if match else None


@frozen
class RestoreResult:
    """What a restore did.

    Attributes:
        vm: The registered VM as VirtualBox reports it after the restore, or
            ``None`` with ``register=False``.
        stats: What the data path did (bytes fetched, copied, written, verified).
        removed: Stale files removed from the target folder (absolute paths).
        resumed: Whether an interrupted restore of the same archive was continued.
        settings_file: The settings file written.
        ejected: The DVD and floppy drives restored empty because their images
            were missing on this host (``eject_missing_images=True``).
    """

    vm: VMInfo | None
    stats: ApplyStats
    removed: tuple[Path, ...]
    resumed: bool
    settings_file: Path
    ejected: tuple[ImageDrive, ...] = ()


@define(eq=False)
class Restorer:
    """Restores VMs from archives: incremental, resumable, verified.

    Args:
        host: The VirtualBox host to register the VM on.
        repository: The open repository the archives are in.
        cpu_vendor: This host's CPU vendor, compared with a saved state's
            (default: read from ``/proc/cpuinfo``).
        state_dir: vbremote's state folder, which holds the lock files that
            :meth:`restore` shares with the :class:`~vbremote.Snapshotter`
            (default: ``$XDG_STATE_HOME/vbremote``, else ``~/.local/state/vbremote``).
        lock_wait: Seconds :meth:`restore` waits when a snapshot run or
            another restore holds the VM's lock or the target folder's
            (default: do not wait).

    Raises:
        ConfigurationError: A negative ``lock_wait``.
    """

    host: VirtualBoxHost
    repository: Repository
    cpu_vendor: str | None = attrs.field(factory=cpu_vendor)
    state_dir: Path = attrs.field(default=None, converter=state_dir_or_default, kw_only=True)
    lock_wait: float = attrs.field(default=0.0, kw_only=True)

    def __attrs_post_init__(self) -> None:
        check_lock_wait(self.lock_wait)

    # -- planning -----------------------------------------------------------------

    def source(self, archive: ArchiveInfo | str, *, external: Mapping[str, str] | None = None) -> RestoreSource:
        """What ``archive`` restores, checked before anything is written.

        A vbremote archive is read from its metadata
        (:func:`vbremote._restorer.source_from_archive`); an archive without
        vbremote metadata (made with the borg CLI from a VM folder, e.g. by
        the PowerShell tool) from its items and its settings file
        (:func:`vbremote._restorer._foreign.foreign_source`).

        Raises:
            ArchiveNotFound: No archive of that name.
            ArchiveInvalid: The archive is hostile or broken (its metadata
                included: :class:`ArchiveMetadataError` is one); it names the archive.
            ConfigurationError: ``external`` for an archive of another tool, or a bad mapping.
        """
        if isinstance(archive, ArchiveInfo):
            return _no_reserved_names(source_from_archive(self.repository, archive, external=external))
        try:
            info = self.repository.archive(archive)
        except ArchiveNotFound:
            contents = self.repository.chunk_lists(archive)  # ArchiveNotFound if there is none at all
            if external:
                raise ConfigurationError(f"archive {archive!r} was made by another tool: it has no _external/ files"
                                         ) from None
            return _no_reserved_names(foreign_source(self.repository, archive, contents))
        return _no_reserved_names(source_from_archive(self.repository, info, external=external))

    def plan(
        self,
        archive: ArchiveInfo | str,
        target: str | os.PathLike[str] | None = None,
        seeds: Sequence[str | os.PathLike[str]] = (),
        *,
        power_off: bool = False,
        discard_state: bool = False,
        cpu_portability_level: int | None = None,
        as_new: str | None = None,
        external: Mapping[str, str] | None = None,
        eject_missing_images: bool = False,
        progress: Callable[[Progress], None] | None = None,
        allow_host_references: bool = False,
    ) -> RestorePlan:
        """What restoring ``archive`` does, block by block, and what stops it; writes nothing.

        A plan takes no lock: a snapshot run or a restore going on meanwhile
        can make it stale (the files it compared change). :meth:`restore`
        makes its own plan under the locks.

        Args:
            archive: The archive (an :class:`ArchiveInfo` or its name).
            target: The VM folder to restore into. ``None``: the folder of the
                registered VM with the archive's uuid, or the host's default
                machine folder plus the VM's name (``as_new``: plus the new
                name) if there is none.
            seeds: Further local files that may hold needed data (only read).
            power_off: The restore will power a running VM off (no ``vm-running`` problem).
            discard_state: Restore a saved-state archive ``PoweredOff`` (no
                version or CPU problems); its state file is not restored.
            cpu_portability_level: The level the restored VM gets (0 to 3).
            as_new: Restore as a new VM of this name (new uuids), beside the current one.
            external: Where ``_external/`` files go, relative to the target.
            eject_missing_images: Restore the DVD and floppy drives whose
                images are missing on this host empty (no ``image-missing``
                problem; the plan's ``ejected`` lists them).
            progress: Called while local files are hashed.
            allow_host_references: Keep what the archive's settings give the
                VM of the host (shared folders, serial and parallel ports on
                host files or devices, recording files, ``VBoxInternal``
                ExtraData, VMDK extents outside the folder ...), logging each,
                instead of reporting each as a ``host-reference`` problem.
                Only for archives whose author you trust.

        Returns:
            The plan; its ``problems`` are what :meth:`restore` refuses on
            (each with a ``code``, a ``message`` and a ``remedy``).

        Raises:
            ArchiveNotFound, ArchiveMetadataError, ArchiveInvalid: The archive
                cannot be restored at all (hostile or damaged).
            ConfigurationError: A bad argument.
        """
        source, folder, current = self._prepare(archive, target, as_new=as_new, external=external,
                                                cpu_portability_level=cpu_portability_level,
                                                discard_state=discard_state)
        _, local_seeds = self._local_files(folder, source, current, as_new=as_new)
        plan = make_plan(self.repository, source, folder, seeds=[*seeds, *sorted(local_seeds)], progress=progress)
        problems = self._preflight(source, folder, power_off=power_off, discard_state=discard_state,
                                   cpu_portability_level=cpu_portability_level, as_new=as_new,
                                   allow_host_references=allow_host_references)
        missing = _missing_drives(source, folder)
        if not eject_missing_images:
            problems += _image_problems(missing)
        return attrs.evolve(plan, problems=(*plan.problems, *problems),
                            ejected=missing if eject_missing_images else ())

    def _prepare(
        self,
        archive: ArchiveInfo | str,
        target: str | os.PathLike[str] | None,
        *,
        as_new: str | None,
        external: Mapping[str, str] | None,
        cpu_portability_level: int | None,
        discard_state: bool,
    ) -> tuple[RestoreSource, Path, VMInfo | None]:
        if as_new is not None and (not isinstance(as_new, str) or not _VM_NAME.fullmatch(as_new)
                                   or as_new in (".", "..")):
            raise ConfigurationError(f"as_new must be a VM name (no slashes), not {as_new!r}")
        if cpu_portability_level is not None and (
                not isinstance(cpu_portability_level, int) or not 0 <= cpu_portability_level <= 3):
            raise ConfigurationError(f"the CPU portability level is 0 to 3, not {cpu_portability_level!r}")
        source = self.source(archive, external=external)
        if discard_state:
            source = _without_machine_state(source)
        current = self._registered(source.vm_uuid)
        if target is not None:
            folder = Path(os.path.abspath(target))
        elif as_new is not None:
            folder = self.host.default_machine_folder / as_new
        elif current is not None:
            folder = current.folder
        elif (unfinished := self._unfinished_folder(source.vm_uuid)) is not None:
            # An interrupted in-place restore unregistered the VM: it goes on in the VM's own folder.
            folder = unfinished
        else:
            # The name comes from the archive: only ever one folder below the default machine folder.
            name = machine_folder_name(source.vm_name)
            folder = self.host.default_machine_folder / name
            if not name or folder.parent != self.host.default_machine_folder:
                raise ArchiveInvalid(f"archive {source.archive!r}: its VM's name {source.vm_name!r} gives no folder"
                                     " name; give the restore a target folder", archive=source.archive)
        return source, folder, current

    # An in-place restore unregisters the VM before it writes. Until it has finished, a record
    # in the state folder keeps the VM's folder, so that target=None finds it again after an
    # interruption (the VM is then registered nowhere to be found by its uuid).

    def _unfinished_record(self, uuid: str) -> Path:
        return self.state_dir / "restoring" / f"{vm_key(uuid)}.json"

    def _unfinished_folder(self, uuid: str) -> Path | None:
        """The folder of an interrupted in-place restore of VM ``uuid``, if one is recorded and still there."""
        try:
            recorded = json.loads(self._unfinished_record(uuid).read_text())["folder"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        folder = Path(recorded) if isinstance(recorded, str) else None
        try:
            if folder is None or not folder.is_absolute() or not folder.is_dir():
                return None
        except OSError:
            return None
        return folder

    def _record_unfinished(self, uuid: str, folder: Path, archive: str) -> None:
        record = self._unfinished_record(uuid)
        try:
            record.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            _write_atomically(record, json.dumps({"folder": os.fspath(folder), "archive": archive}).encode())
        except OSError as exc:
            raise ConfigurationError(f"cannot use the state folder {self.state_dir}: {exc.strerror}") from exc

    def _registered(self, uuid: str) -> VMInfo | None:
        try:
            return self.host.vm(uuid)
        except VMNotFound:
            return None

    def _preflight(
        self,
        source: RestoreSource,
        folder: Path,
        *,
        power_off: bool,
        discard_state: bool,
        cpu_portability_level: int | None,
        as_new: str | None,
        allow_host_references: bool = False,
    ) -> list[PlanProblem]:
        problems: list[PlanProblem] = []
        current = self._registered(source.vm_uuid)
        if as_new is not None:
            # A new VM's disks get new uuids, written into their headers: vbremote rewrites VDI headers only.
            others = sorted({m.format for m in parse_settings(source.settings).all_media()
                             if m.format.upper() != "VDI"})
            if others:
                problems.append(PlanProblem(
                    "as-new-format", f"the archive's disks include {', '.join(others)} images; a restore as a new "
                    "VM gives each disk a new uuid, which vbremote can write into VDI headers only",
                    "restore in place or into another folder on another host (same uuids), or convert the "
                    "disks to VDI"))
            for vm in self.host.vms():
                if vm.name == as_new:
                    problems.append(PlanProblem(
                        "name-taken", f"a VM named {as_new!r} is registered ({vm.uuid}, {vm.folder})",
                        "choose another name for as_new"))
                if vm.folder == folder:
                    problems.append(PlanProblem(
                        "target-in-use", f"{folder} is the folder of the registered VM {vm.name!r}",
                        "restore as a new VM into another folder"))
        elif current is not None and current.folder != folder:
            problems.append(PlanProblem(
                "uuid-elsewhere",
                f"a VM with this archive's uuid {source.vm_uuid} ({current.name!r}) is registered from "
                f"{current.folder}; a second VM with the same uuid cannot be registered from {folder}",
                f"restore in place (target=None or {current.folder}), unregister that VM first, "
                f"or restore as a new VM (as_new='name')"))
        elif current is not None and not current.state.is_off and not power_off:
            problems.append(PlanProblem(
                "vm-running", f"the VM {current.name!r} is {current.state.value}",
                "power it off (or save its state) first, or pass power_off=True"))
        if as_new is None:
            for vm in self.host.vms():
                if vm.uuid != source.vm_uuid and vm.folder == folder:
                    problems.append(PlanProblem(
                        "target-in-use", f"{folder} is the folder of another registered VM, {vm.name!r}",
                        "restore into another folder"))
        if _saved(source) and not discard_state:
            problems.extend(self._saved_state_problems(source, cpu_portability_level))
        # The settings are registered as archived: whatever of the host they name, the VM gets when it starts.
        for reference in source_host_references(self.repository, source, folder=folder):
            if allow_host_references:
                log.warning("%s: archive %s gives the VM %s: %s (allowed)", source.vm_name, source.archive,
                            reference.what, reference.value)
                continue
            problems.append(PlanProblem(
                "host-reference",
                f"the archive's settings give the VM {reference.what}: {reference.value!r}; VirtualBox gives the "
                "restored VM that host path or setting when it starts (an archive of your own VM has it if the VM "
                "had it when the snapshot was taken)",
                "restore with allow_host_references=True (vbremote restore --allow-host-references) if you trust "
                "this archive's author, or remove it from the VM's settings in the archive"))
        return problems

    def _saved_state_problems(self, source: RestoreSource, cpu_portability_level: int | None) -> list[PlanProblem]:
        problems: list[PlanProblem] = []
        here = _major_minor(self.host.version)
        there = _major_minor(source.vbox_version)
        # An archive of another tool records no version (nor CPU): nothing to
        # compare, and VirtualBox refuses to load a saved state it cannot
        # (the VM then stays Saved and its state can be discarded).
        if there is not None and here != there:
            problems.append(PlanProblem(
                "vbox-version",
                f"the saved state was written by VirtualBox {source.vbox_version}; this host runs "
                f"{self.host.version}, and a saved state only loads in the same major.minor release",
                f"pass discard_state=True to restore it powered off, or restore on a host with VirtualBox "
                f"{there[0]}.{there[1]}"))
        if source.cpu_vendor and self.cpu_vendor and source.cpu_vendor != self.cpu_vendor:
            problems.append(PlanProblem(
                "cpu-vendor",
                f"the saved state was taken on a {source.cpu_vendor} CPU; this host's is {self.cpu_vendor}, and a "
                "guest cannot resume on another vendor's CPU",
                "pass discard_state=True to restore it powered off (and cpu_portability_level= to set the level "
                "the VM boots with)"))
        elif (source.cpu_portability or 0) == 0 and cpu_portability_level is None and source.cpu_vendor \
                and self._other_host(source):
            problems.append(PlanProblem(
                "cpu-portability",
                "the saved state was taken on another host with CPU portability level 0 (every host CPU feature "
                "visible to the guest); it resumes only where the CPU has the same features",
                "pass cpu_portability_level= (0 to 3) to accept and set the level, or discard_state=True to "
                "restore it powered off"))
        return problems

    def _other_host(self, source: RestoreSource) -> bool:
        try:
            info = self.repository.archive(source.archive)
        except Exception:  # a foreign archive records no host
            return False
        return info.metadata.host is not None and info.metadata.host != socket.gethostname()

    # -- restoring ----------------------------------------------------------------

    def restore(
        self,
        archive: ArchiveInfo | str,
        target: str | os.PathLike[str] | None = None,
        *,
        power_off: bool = False,
        register: bool = True,
        verify: Verify = "written",
        seeds: Sequence[str | os.PathLike[str]] = (),
        discard_state: bool = False,
        cpu_portability_level: int | None = None,
        as_new: str | None = None,
        external: Mapping[str, str] | None = None,
        eject_missing_images: bool = False,
        progress: Callable[[Progress], None] | None = None,
        allow_host_references: bool = False,
    ) -> RestoreResult:
        """Restore ``archive`` into ``target`` and register the VM.

        The order: take the VM's lock (the archive's VM uuid, shared with
        snapshot runs; also for ``as_new``, which reads the current VM's
        files) and the target folder's, held to the end; preflight (nothing
        written); power off if asked (before the plan, which compares the
        VM's files); plan (the ``no-space`` check); record the stale files in
        the target; unregister the VM being replaced; write the data
        (resumable: run again after an interruption and it continues); write
        the settings file; register and check the VM; remove the stale files
        (also those an interrupted restore of the VM into the folder recorded).

        A restore as a new VM reads the current VM's files as seeds when it
        is not running (its disks hold most of the data of any of its archives).

        Args:
            archive, target, seeds, power_off, discard_state, cpu_portability_level, as_new, external:
                As for :meth:`plan`.
            allow_host_references: As for :meth:`plan`.
            eject_missing_images: Restore the DVD and floppy drives whose images
                are missing on this host empty: the settings file written
                attaches nothing there and its media registry drops those
                images; each is logged and listed in ``ejected``. Without it a
                missing image is an ``image-missing`` problem.
            register: Register the VM (``False``: only write the files).
            verify: ``"written"``, ``"full"`` or ``"none"`` (see :func:`apply_plan`).
            progress: Called with :class:`Progress` events while hashing and writing.

        Returns:
            The registered VM, the data path's stats, the stale files removed.

        Raises:
            RestoreLocked: A snapshot run or another restore holds the VM's lock
                or the target folder's (after ``lock_wait``); nothing was changed.
            RestorePreflightFailed: The plan has problems (listed on the error); nothing was written.
            IntegrityError: A chunk failed verification; the VM is not registered.
            TargetSpaceError: The target is full; run again once space is freed.
            RestoreError: The restored VM did not register as expected, or writing failed.
            ArchiveNotFound, ArchiveMetadataError, ArchiveInvalid, ConfigurationError: As for :meth:`plan`.
        """
        source, folder, current = self._prepare(archive, target, as_new=as_new, external=external,
                                                cpu_portability_level=cpu_portability_level,
                                                discard_state=discard_state)
        with contextlib.ExitStack() as locks:
            # The archive's uuid also for a new VM: it reads the current VM's files as seeds.
            self._hold(locks, source, vm_key(source.vm_uuid), f"the VM {source.vm_name!r}")
            fresh = self._registered(source.vm_uuid)
            if (fresh is None) != (current is None) or (
                    fresh is not None and current is not None and fresh.folder != current.folder):
                # The VM changed while the lock was waited for: where it restores to may have too.
                source, folder, current = self._prepare(archive, target, as_new=as_new, external=external,
                                                        cpu_portability_level=cpu_portability_level,
                                                        discard_state=discard_state)
            else:
                current = fresh
            self._hold(locks, source, _folder_key(folder), f"the target folder {folder}")
            result = self._restore(source, folder, current, power_off=power_off, register=register,
                                   verify=verify, seeds=seeds, discard_state=discard_state,
                                   cpu_portability_level=cpu_portability_level, as_new=as_new, progress=progress,
                                   allow_host_references=allow_host_references,
                                   eject_missing_images=eject_missing_images)
        return result

    def _hold(self, locks: contextlib.ExitStack, source: RestoreSource, key: str, what: str) -> None:
        """Take the lock ``key`` (a VM uuid or a folder's key) into ``locks``; :class:`RestoreLocked` if held."""
        try:
            path = locks.enter_context(vm_lock(self.state_dir, key, wait=self.lock_wait, vm=what))
        except SnapshotInProgress as exc:
            raise RestoreLocked(
                f"archive {source.archive!r} cannot be restored now: a snapshot run or another restore holds the "
                f"lock of {what} ({exc.lock_file}); waited {self.lock_wait:g} s, nothing was changed",
                archive=source.archive, vm=source.vm_name, lock_file=exc.lock_file) from None
        log.debug("%s: holding %s", what, path)

    def _restore(
        self,
        source: RestoreSource,
        folder: Path,
        current: VMInfo | None,
        *,
        power_off: bool,
        register: bool,
        verify: Verify,
        seeds: Sequence[str | os.PathLike[str]],
        discard_state: bool,
        cpu_portability_level: int | None,
        as_new: str | None,
        progress: Callable[[Progress], None] | None,
        allow_host_references: bool,
        eject_missing_images: bool,
    ) -> RestoreResult:
        problems = self._preflight(source, folder, power_off=power_off, discard_state=discard_state,
                                   cpu_portability_level=cpu_portability_level, as_new=as_new,
                                   allow_host_references=allow_host_references)
        # Checked once, before any write: the drives ejected are the ones found missing here.
        missing = _missing_drives(source, folder)
        if not eject_missing_images:
            problems += _image_problems(missing)
        if problems:
            raise _refused(source, folder, problems)
        ejected = missing if eject_missing_images else ()
        in_place = as_new is None
        running = in_place and current is not None and current.state.is_running and power_off
        old_files, local_seeds = self._local_files(folder, source, current, as_new=as_new)
        settings_path = folder / (source.settings_path if as_new is None else f"{as_new}.vbox")
        written = {folder / f.target_path for f in source.files} | {settings_path}
        if running:
            # Every check a plan makes runs before the VM is powered off: a plan of the running VM
            # first (its comparison goes stale at once, but a symlink in the folder, an unreadable
            # seed or too little space refuses the restore while the VM still runs); the plan that
            # counts is made after the power-off, of disks that no longer change.
            trial = make_plan(self.repository, source, folder, seeds=[*seeds, *sorted(local_seeds)],
                              progress=progress)
            if trial.problems:
                raise _refused(source, folder, trial.problems)
        # Before anything changes (the power-off included) and while the old settings still name them:
        # the stale files, and the folder of a VM about to be unregistered, are recorded. A refusal
        # before the VM is unregistered puts both records back as they were.
        previous_stale = load_stale(folder, source.vm_uuid) if in_place else set()
        stale = self._stale_files(folder, source, old_files, written) if in_place else set()
        # Chunks the plan will fetch start coming while it still hashes; nothing is written before the apply.
        with Prefetch(self.repository) as prefetch:
            try:
                if in_place and current is not None:
                    self._record_unfinished(source.vm_uuid, folder, source.archive)
                if running and current is not None:
                    log.info("%s: powering off for the restore", current.name)
                    self.host.power_off(current)
                plan = make_plan(self.repository, source, folder, seeds=[*seeds, *sorted(local_seeds)],
                                 progress=progress, fetch_known=prefetch)
                if plan.problems:
                    raise _refused(source, folder, plan.problems)
                if in_place and current is not None:
                    log.info("%s: unregistering before the restore writes", current.name)
                    self.host.unregister(current)
            except BaseException:
                self._undo_records(folder, source, previous_stale, current)
                raise
            with _writing(folder, source.archive):
                folder.mkdir(parents=True, exist_ok=True)
            stats = apply_plan(self.repository, plan, verify=verify, progress=progress, prefetch=prefetch)
        settings = settings_with(source.settings, drop_state=discard_state,
                                 cpu_portability_level=cpu_portability_level)
        settings = eject_images(settings, {drive.uuid for drive in ejected})
        for drive in ejected:
            log.warning("%s: the %s image %s is missing on this host; the %s is restored empty", source.vm_name,
                        drive.kind, drive.image, drive.describe())
        if as_new is not None:
            settings, _, media = new_identity(settings, name=as_new)
            with _writing(folder, source.archive):
                for f in source.files:
                    if f.role is FileRole.DISK:
                        set_vdi_uuids(folder / f.target_path, media)
        try:
            # A final guard: every path stays inside the folder the file is written to.
            settings = relocate(settings, old_folder=str(folder))
        except SettingsFileError as exc:
            raise RestoreError(f"archive {source.archive!r}: {exc}", archive=source.archive) from exc
        with _writing(folder, source.archive):
            _write_atomically(settings_path, settings)
        info = None
        if register:
            info = self.host.register(settings_path)
            self._check(info, source, settings, discard_state=discard_state)
        removed = self._remove_stale(folder, source, stale, keep=written | _referenced(settings_path, settings)
                                     ) if in_place else ()
        if in_place:
            try:
                self._unfinished_record(source.vm_uuid).unlink(missing_ok=True)
            except OSError as exc:  # the restore is done; the record only points target=None at this folder
                log.warning("%s: cannot remove %s: %s", source.vm_name, self._unfinished_record(source.vm_uuid),
                            exc.strerror)
        log.info("%s: restored from %s into %s (%d bytes fetched, %d stale files removed)", source.vm_name,
                 source.archive, folder, stats.bytes_fetched, len(removed))
        return RestoreResult(vm=info, stats=stats, removed=removed, resumed=stats.resumed,
                             settings_file=settings_path, ejected=ejected)

    def _local_files(
        self, folder: Path, source: RestoreSource, current: VMInfo | None, *, as_new: str | None
    ) -> tuple[set[Path], set[Path]]:
        """The old VM's files an in-place restore replaces, and the local files to read as seeds.

        In place, the old VM's files outside the folder (disks it kept elsewhere)
        hold most of the data of their archived copies; as a new VM, all the
        current VM's files do (when it is off). They are read, never written.
        """
        if as_new is None:
            return self._old_files(folder, source, current)
        mine = current if current is not None and current.state.is_off else None
        inside, outside = self._old_files(mine.folder, source, mine) if mine is not None else (set(), set())
        return set(), inside | outside

    def _old_files(self, folder: Path, source: RestoreSource, current: VMInfo | None) -> tuple[set[Path], set[Path]]:
        """The data files the old VM's settings name: those inside ``folder``, and those outside it.

        The old settings are the registered VM's file, or (the VM was
        unregistered by an interrupted restore) the settings file in the target folder.
        """
        candidates = [current.settings_file] if current is not None else []
        candidates.append(folder / source.settings_path)
        for path in candidates:
            try:
                settings = parse_settings(path.read_bytes())
            except (OSError, SettingsFileError):
                continue
            if settings.uuid != source.vm_uuid:
                continue
            inside: set[Path] = set()
            outside: set[Path] = set()
            for written, _role, _what in referenced_files(settings):
                absolute = Path(os.path.normpath(path.parent / written))
                if absolute.is_relative_to(folder) and absolute != folder:
                    inside.add(absolute)
                elif absolute.is_file():
                    outside.add(absolute)
            return inside, outside
        return set(), set()

    def _undo_records(self, folder: Path, source: RestoreSource, previous: set[Path], current: VMInfo | None
                      ) -> None:
        """Put the stale record (and the unfinished-restore record) back as they were before this restore."""
        with contextlib.suppress(OSError):
            if previous:
                save_stale(folder, source.vm_uuid, previous)
            elif folder.is_dir():
                forget_stale(folder, source.vm_uuid)
        if current is not None:
            with contextlib.suppress(OSError):
                self._unfinished_record(source.vm_uuid).unlink()

    def _stale_files(self, folder: Path, source: RestoreSource, old: set[Path], written: set[Path]) -> set[Path]:
        """The files an in-place restore removes once done, persisted in the target before anything changes.

        ``old`` are the files inside the folder that the old settings name,
        ``written`` those the restore writes; an interrupted restore's list
        (its old settings may be gone by now) adds what it still names.
        """
        candidates = (old | load_stale(folder, source.vm_uuid)) - written
        stale = {p for p in candidates if is_regular_inside(folder, p)}
        if stale:
            try:
                save_stale(folder, source.vm_uuid, stale)
            except OSError as exc:
                raise RestoreError(f"archive {source.archive!r}: cannot record the stale files in {folder}: "
                                   f"{exc.strerror}; nothing was changed", archive=source.archive) from exc
        return stale

    def _remove_stale(self, folder: Path, source: RestoreSource, stale: set[Path], *, keep: set[Path]
                      ) -> tuple[Path, ...]:
        """Remove ``stale`` but what ``keep`` names, then the persisted list; returns the files removed."""
        removed = remove_stale(folder, stale, keep)
        if folder / stale_name(source.vm_uuid) not in keep:
            try:
                forget_stale(folder, source.vm_uuid)
            except OSError as exc:  # the files are gone; a list left names nothing a later restore may remove
                log.warning("%s: cannot remove the stale-file list in %s: %s", source.vm_name, folder, exc.strerror)
        return removed

    def _check(self, info: VMInfo, source: RestoreSource, settings: bytes, *, discard_state: bool) -> None:
        """The registered VM is what the archive holds; otherwise unregister it again and raise."""
        problems: list[str] = []
        saved = _saved(source) and not discard_state
        # A VM archived after a crash keeps its "aborted" mark (Aborted, or AbortedSaved with a state
        # file: Machine::i_loadMachineDataFromSettings, MachineImpl.cpp of 7.1.12).
        expected = (MachineState.SAVED, MachineState.ABORTED_SAVED) if saved else (
            MachineState.POWERED_OFF, MachineState.ABORTED)
        if info.state not in expected:
            problems.append(f"it is {info.state.value}, not {expected[0].value}")
        media = [m for a in info.attachments for m in a.chain]
        if info.snapshot_tree is not None:
            media += [m for s in info.snapshot_tree.walk() for a in s.attachments for m in a.chain]
        problems += [f"medium {m.location} is inaccessible: {m.access_error}" for m in media if not m.accessible]
        wanted = {node.uuid for node in parse_settings(settings).snapshots()}
        there = {s.uuid for s in info.snapshot_tree.walk()} if info.snapshot_tree is not None else set()
        if wanted != there:
            problems.append(f"its snapshots are {sorted(there)}, not {sorted(wanted)}")
        if problems:
            with contextlib.suppress(Exception):
                self.host.unregister(info)
            raise RestoreError(
                f"archive {source.archive!r}: the restored VM {info.name!r} did not register as archived: "
                + "; ".join(problems) + "; it was unregistered again", archive=source.archive)


def _missing_drives(source: RestoreSource, folder: Path) -> tuple[ImageDrive, ...]:
    """The drives of the archived settings whose DVD or floppy image is not on this host."""
    drives = image_drives(parse_settings(source.settings), folder)
    return tuple(drive for using in missing_images(drives).values() for drive in using)


def _image_problems(drives: Sequence[ImageDrive]) -> list[PlanProblem]:
    """One ``image-missing`` problem per missing image, naming its path, the drives and the ways out."""
    by_image: dict[Path, list[ImageDrive]] = {}
    for drive in drives:
        by_image.setdefault(drive.image, []).append(drive)
    problems = []
    for image, using in by_image.items():
        problems.append(PlanProblem(
            "image-missing",
            f"the {using[0].kind} image {image} is not on this host (an archive refers to images, it does not "
            "hold them); the archived settings attach it to the " + ", ".join(d.describe() for d in using),
            f"put the image (or a copy of it) back at {image}, or pass eject_missing_images=True "
            f"(--eject-missing-images) to restore {'that drive' if len(using) == 1 else 'those drives'} empty"))
    return problems


def _refused(source: RestoreSource, folder: Path, problems: Sequence[PlanProblem]) -> RestorePreflightFailed:
    listed = "; ".join(f"{p.code}: {p.message} ({p.remedy})" for p in problems)
    return RestorePreflightFailed(f"archive {source.archive!r} cannot be restored into {folder}: {listed}",
                                  archive=source.archive, problems=tuple(problems))


@contextlib.contextmanager
def _writing(folder: Path, archive: str) -> Iterator[None]:
    """Raise what goes wrong writing into ``folder`` as :class:`TargetSpaceError` or :class:`RestoreError`."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise TargetSpaceError(
                f"the file system of {folder} is full: {exc.strerror}; free space and restore again to continue",
                archive=archive, path=exc.filename) from exc
        raise RestoreError(f"writing into {folder} failed: {exc}", archive=archive, path=exc.filename) from exc


def _write_atomically(path: Path, data: bytes) -> None:
    """Write, fsync, rename over, fsync the folder: the file is the old one or the new one, whole."""
    replace_durably(path, data)


def _folder_key(folder: Path) -> str:
    """The lock key of a target folder: a hash of its real path (the folder may not exist yet)."""
    return "folder-" + hashlib.sha256(os.fsencode(os.path.realpath(folder))).hexdigest()[:32]


def _referenced(settings_path: Path, settings: bytes) -> set[Path]:
    """The files the settings written to ``settings_path`` reference, as absolute normalised paths."""
    return {Path(os.path.normpath(settings_path.parent / written))
            for written, _role, _what in referenced_files(parse_settings(settings))}
