"""Checks of a settings file that came from an archive, before a restore uses it.

A restore registers the settings file it finds in an archive, and VirtualBox
then opens (and writes) every hard disk, saved state and NVRAM file that the
file names. An archive is input from a server that may be compromised, so
every such path must stay inside the target folder: relative, normalised,
POSIX-style, no ``..``. VirtualBox itself only ever writes forward slashes
(``ElementNode::setAttributePath`` replaces backslashes, src/VBox/Runtime/r3/xml.cpp,
6.1 to 7.2, which Settings.cpp uses for every path attribute), and paths
inside the machine folder relative to it (Machine::i_copyPathRelativeToMachine,
src/VBox/Main/src-server/MachineImpl.cpp), so a backslash, a Windows drive
letter or an absolute path is refused, not guessed at.

Both kinds of archives use these checks: vbremote's own (whose settings were
relocated when the snapshot was taken) and those of other tools.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

from attrs import frozen

from .._errors import ArchiveInvalid, ConfigurationError, RepositoryError, SettingsFileError
from .._models import FileRole, _check_archive_path
from .._settings import MachineSettings, parse_settings

__all__ = ["SettingsReference", "check_settings", "settings_references"]

#: Builds the error that names the archive: :class:`ArchiveInvalid` or
#: :class:`ArchiveMetadataError` (both take these arguments).
ErrorFactory = Callable[..., RepositoryError]

_DRIVE = re.compile(r"^[A-Za-z]:")


@frozen
class SettingsReference:
    """A file that a settings file names, checked to stay inside the VM folder.

    Attributes:
        path: Relative to the VM folder (the settings file's folder), normalised.
        role: What the file is to the VM.
        what: Which element names it, for messages (e.g. ``medium {uuid}``).
    """

    path: str
    role: FileRole
    what: str


def check_settings(
    data: bytes, *, archive: str, location: str = "", error: ErrorFactory = ArchiveInvalid
) -> tuple[MachineSettings, tuple[SettingsReference, ...]]:
    """Parse an archive's settings file and check every file it names.

    Args:
        data: The settings file's bytes, as the archive holds them.
        archive: The archive's name (for the error).
        location: The repository's location (for the error).
        error: The error class to raise, :class:`ArchiveInvalid` (the
            default) or :class:`ArchiveMetadataError`.

    Returns:
        The parsed settings and every file they name (see :func:`settings_references`).

    Raises:
        ArchiveInvalid: (or ``error``) The file is not a VirtualBox settings
            file, declares a DOCTYPE or entities, is too large, or names a
            file outside the VM folder.
    """
    try:
        settings = parse_settings(data)
    except SettingsFileError as exc:
        raise error(f"archive {archive!r}: its settings file is refused: {exc}", location=location,
                    archive=archive) from exc
    return settings, settings_references(settings, archive=archive, location=location, error=error)


def settings_references(
    settings: MachineSettings, *, archive: str, location: str = "", error: ErrorFactory = ArchiveInvalid
) -> tuple[SettingsReference, ...]:
    """Every file a settings file names, each checked to stay inside the VM folder.

    Named are: every hard disk of the media registry (the whole snapshot
    history's), the saved-state files of the machine and of its snapshots,
    and the NVRAM files of the machine and of its snapshots. The snapshot
    folder, where VirtualBox creates new files, is checked too. Optical and
    floppy images are not: VirtualBox only reads them, and a restore never
    writes them (an ISO outside the folder is normal).

    Args:
        settings: The parsed settings file.
        archive: The archive's name (for the error).
        location: The repository's location (for the error).
        error: The error class to raise.

    Returns:
        Each file once, in the order found: media, saved states, NVRAM files.

    Raises:
        ArchiveInvalid: (or ``error``) A path that is absolute, has a drive
            letter or a backslash, is not normalised or leaves the folder; one
            path named as two different kinds of file.
    """
    found: dict[str, SettingsReference] = {}
    for reference in _named(settings):
        path = _inside(reference.path, reference.what, archive=archive, location=location, error=error)
        earlier = found.get(path)
        if earlier is not None and earlier.role is not reference.role:
            raise error(
                f"archive {archive!r}: its settings name {path!r} both as {earlier.what} and as {reference.what}",
                location=location, archive=archive,
            )
        found.setdefault(path, SettingsReference(path=path, role=reference.role, what=reference.what))
    if settings.snapshot_folder:
        _inside(settings.snapshot_folder, "the snapshot folder", archive=archive, location=location, error=error)
    return tuple(found.values())


def _named(settings: MachineSettings) -> Iterator[SettingsReference]:
    for medium in settings.all_media():
        yield SettingsReference(medium.location, FileRole.DISK, f"medium {{{medium.uuid}}}")
    if settings.state_file:
        yield SettingsReference(settings.state_file, FileRole.STATE, "the machine's saved state")
    for snapshot in settings.snapshots():
        if snapshot.state_file:
            what = f"the saved state of snapshot {snapshot.name!r}"
            yield SettingsReference(snapshot.state_file, FileRole.STATE, what)
    if settings.nvram:
        yield SettingsReference(settings.nvram, FileRole.NVRAM, "the machine's NVRAM file")
    for snapshot in settings.snapshots():
        if snapshot.nvram:
            yield SettingsReference(snapshot.nvram, FileRole.NVRAM, f"the NVRAM file of snapshot {snapshot.name!r}")


def _inside(path: str, what: str, *, archive: str, location: str, error: ErrorFactory) -> str:
    problem = None
    if _DRIVE.match(path):
        problem = "a path with a drive letter"
    else:
        try:
            return _check_archive_path(path)
        except ConfigurationError as exc:
            problem = str(exc)
    raise error(
        f"archive {archive!r}: its settings name a file outside the VM folder ({what}: {path!r}; {problem})",
        location=location, archive=archive,
    )
