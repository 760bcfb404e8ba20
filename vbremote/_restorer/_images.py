"""DVD and floppy images: referred to by an archive, never in it; found missing before a restore writes.

The Snapshotter archives no DVD or floppy image: the archived settings name
each by its absolute path on the snapshotted host (see
:func:`vbremote._snapshotter._collect.anchor_images`). A restore onto another
host, or after the image was deleted, finds some of them missing.

VirtualBox itself does not refuse such a machine: ``openMachine`` loads the
registry's images without opening them (VirtualBox::initMedia with
Medium::init on 6.1.38, Medium::initFromSettings on 7.1.12, leaves them
Inaccessible, "Accessibility check was not yet performed"; VirtualBoxImpl.cpp
and MediumImpl.cpp), ``registerMachine`` does not check media, ``IMedium::refreshState`` then reports
the missing file (Medium::i_queryInfo, VERR_FILE_NOT_FOUND), and a VM start
ignores the image with a runtime warning, "The image file ... is inaccessible
and is being ignored" (Console::i_configMedium, ConsoleImpl2.cpp of 6.1.38,
ConsoleImplConfigCommon.cpp of 7.1.12), so the guest runs with that drive
empty. The Restorer's own check refuses a VM with an inaccessible medium, so
a missing image is found in the preflight instead, before anything is written,
and ``eject_missing_images=True`` restores those drives empty.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable
from pathlib import Path

from attrs import frozen

from .._settings import Attachment, MachineSettings

__all__ = ["ImageDrive", "image_drives", "missing_images"]


@frozen
class ImageDrive:
    """A drive that the archived settings attach a DVD or floppy image to.

    Attributes:
        image: The image's path on this host (absolute; a relative path in the
            settings is taken relative to the target folder).
        kind: ``"DVD"`` or ``"Floppy"``.
        uuid: The image's medium uuid.
        controller: The storage controller's name.
        port: The port on the controller.
        device: The device on the port.
        snapshot: The name of the user snapshot whose hardware attaches it, or
            ``None`` for the machine's current state.
    """

    image: Path
    kind: str
    uuid: str
    controller: str
    port: int
    device: int
    snapshot: str | None = None

    def describe(self) -> str:
        """The drive in words, e.g. ``DVD drive SATA port 2 device 0 of snapshot 'first'``."""
        where = "the current state" if self.snapshot is None else f"snapshot {self.snapshot!r}"
        return f"{self.kind} drive {self.controller} port {self.port} device {self.device} of {where}"


def image_drives(settings: MachineSettings, folder: Path) -> tuple[ImageDrive, ...]:
    """Every drive with a DVD or floppy image of the media registry, in the current state and in every snapshot.

    An attachment naming an image the registry does not list is left out:
    VirtualBox attaches an empty drive for it (Machine::i_loadStorageDevices,
    MachineImpl.cpp: "This is not an error ... go ahead without this
    removeable medium attachment").

    Args:
        settings: The settings to register.
        folder: The target folder (the settings file's folder).

    Returns:
        The drives, the current state's first, then each snapshot's, depth first.
    """
    images = {image.uuid: image for image in settings.images}
    owners: list[tuple[str | None, tuple[Attachment, ...]]] = [(None, settings.attachments)]
    owners += [(node.name, node.attachments) for node in settings.snapshots()]
    drives: list[ImageDrive] = []
    for snapshot, attachments in owners:
        for attachment in attachments:
            image = images.get(attachment.medium or "")
            if attachment.type not in ("DVD", "Floppy") or image is None:
                continue
            location = posixpath.normpath(posixpath.join(str(folder), image.location))
            drives.append(ImageDrive(image=Path(location), kind=image.kind, uuid=image.uuid,
                                     controller=attachment.controller, port=attachment.port,
                                     device=attachment.device, snapshot=snapshot))
    return tuple(drives)


def missing_images(drives: Iterable[ImageDrive]) -> dict[Path, list[ImageDrive]]:
    """The drives whose image file is not on this host, by image (in the order first found).

    Only checked, never opened: a path that is not a regular file (missing,
    a folder, a dangling link) is one VirtualBox cannot open either.
    """
    missing: dict[Path, list[ImageDrive]] = {}
    for drive in drives:
        if not os.path.isfile(drive.image):
            missing.setdefault(drive.image, []).append(drive)
    return missing
