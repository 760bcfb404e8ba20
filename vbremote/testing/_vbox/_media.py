"""Disks: VDI images and their differencing chains, saved-state files, the guest-content model, merges.

The guest-content model is what the guest wrote, per disk (``expected``, in
a temporary file), and what it had written at each snapshot's instant
(``instants``), kept copy-on-write: taking a snapshot copies nothing, a
guest write first keeps the old content of the granules it overwrites (in a
temporary file too) for the instants that have not kept them yet.

Everything here that touches a machine's images runs under its disk lock
(see :mod:`._locks`); :func:`merge` takes the locks itself.
"""

from __future__ import annotations

import os
import random
import time
import uuid as uuid_module
from collections.abc import Iterator

from ..._errors import ConfigurationError
from .._images import MIB, mixed_content
from .._vdi import VDI, VDI_BLOCK_SIZE
from ._locks import Locks
from ._model import GRANULE, Slot, _Attachment, _Content, _Instant, _Machine, _Medium
from ._operations import Operation

__all__ = [
    "GRANULE",
    "check_media",
    "check_medium",
    "content",
    "content_at",
    "detach_instants",
    "drop_medium",
    "expected",
    "forget_instant",
    "guest_write",
    "image",
    "inaccessible_disk",
    "merge",
    "merge_forward",
    "new_diff",
    "record_instant",
    "slot",
    "state_file_in_snapshots",
    "write_sav",
]

_SAV_MAGIC = b"\x7fVirtualBox SavedState V2.0\n"


def check_medium(medium: _Medium) -> None:
    """Open a medium as ``IMedium::refreshState`` does: accessible if its file opens, else why not.

    ``Medium::refreshState`` runs ``Medium::i_queryInfo``
    (``src/VBox/Main/src-server/MediumImpl.cpp``), which sets the state to
    Created or Inaccessible with the reason; a missing file is not an error
    of the call.
    """
    if medium.path.is_file():
        medium.access_error = ""
        if medium.kind != "HardDisk":
            medium.size = medium.path.stat().st_size  # a RAW image's logical size is its file's
    else:
        medium.access_error = (f"Could not open the medium '{medium.path}'. VD: error VERR_FILE_NOT_FOUND opening "
                               f"image file '{medium.path}' (VERR_FILE_NOT_FOUND)")


def check_media(machine: _Machine) -> None:
    """Open every medium of a machine that is not known accessible (as a VM start or a snapshot locks them)."""
    for medium in machine.media.values():
        if not medium.accessible:
            check_medium(medium)


def inaccessible_disk(machine: _Machine) -> _Medium | None:
    """The first medium of the current hard disks' chains that cannot be opened, if any."""
    for attachment in machine.hard_disks():
        uuid = attachment.medium
        while uuid is not None:
            medium = machine.media[uuid]
            if not medium.accessible:
                return medium
            uuid = medium.parent
    return None


def image(machine: _Machine, uuid: str) -> VDI:
    """The open image of medium ``uuid`` (opened with its parents on first use)."""
    found = machine.images.get(uuid)
    if found is None:
        medium = machine.media[uuid]
        parent = image(machine, medium.parent) if medium.parent else None
        found = VDI.open(medium.path, parent=parent)
        machine.images[uuid] = found
    return found


def new_diff(machine: _Machine, parent_uuid: str) -> _Medium:
    """Create a differencing image on ``parent_uuid`` in the machine's ``Snapshots`` folder."""
    new_uuid = str(uuid_module.uuid4())
    path = machine.folder / "Snapshots" / f"{{{new_uuid}}}.vdi"
    path.parent.mkdir(exist_ok=True)
    created = VDI.create_diff(path, image(machine, parent_uuid), image_uuid=new_uuid)
    machine.images[new_uuid] = created
    parent = machine.media[parent_uuid]
    medium = _Medium(new_uuid, path, parent_uuid, parent.size)
    machine.media[new_uuid] = medium
    parent.children.append(new_uuid)
    return medium


def drop_medium(machine: _Machine, uuid: str) -> None:
    """Forget medium ``uuid`` and delete its file."""
    medium = machine.media.pop(uuid)
    if medium.parent:
        machine.media[medium.parent].children.remove(uuid)
    machine.images.pop(uuid, None)
    medium.path.unlink(missing_ok=True)


def write_sav(machine: _Machine, relative: str) -> None:
    """Write a saved-state file at ``relative`` (to the machine folder)."""
    # A saved state: a header and the guest's "RAM" (a fraction of the
    # configured size, so tests stay small), derived from the guest's writes.
    path = machine.path(relative)
    path.parent.mkdir(exist_ok=True)
    seed = (machine.guest.writes if machine.guest else 0, machine.uuid)
    ram = random.Random(str(seed)).randbytes(max(64 * 1024, machine.memory_mb * 1024))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(_SAV_MAGIC + ram)
    os.replace(tmp, path)


def state_file_in_snapshots(machine: _Machine, relative: str) -> bool:
    """Whether a snapshot refers to this saved-state file."""
    return any(s.state_file == relative for s in machine.snapshots.values())


def expected(machine: _Machine, where: Slot) -> _Content:
    """What the guest wrote to the disk at ``where`` (read from the image on first use)."""
    if where not in machine.expected:
        attachment = slot(machine, where)
        assert attachment.medium is not None
        disk = image(machine, attachment.medium)
        model = _Content(disk.size)
        for index in range(disk.size // VDI_BLOCK_SIZE):
            block = disk.read_block(index)
            if block.count(0) != len(block):
                model.write(index * VDI_BLOCK_SIZE, block)
        machine.expected[where] = model
    return machine.expected[where]


def guest_write(machine: _Machine, where: Slot, offset: int, data: bytes) -> None:
    """Record a guest write in the expected content, saving first what instants still need of it."""
    model = expected(machine, where)
    _save_old(machine, where, offset // GRANULE, -(-(offset + len(data)) // GRANULE))
    model.write(offset, data)


def record_instant(machine: _Machine, snapshot_uuid: str) -> None:
    """Mark a snapshot's instant on every current hard disk: nothing is copied until the guest overwrites."""
    disks = {}
    for attachment in machine.hard_disks():
        where = (attachment.controller, attachment.port, attachment.device)
        disks[where] = _Instant(len(expected(machine, where)))
    machine.instants[snapshot_uuid] = disks


def detach_instants(machine: _Machine) -> None:
    """Give every instant its own copy before the expected content is dropped (a restored snapshot)."""
    # An instant not detached yet has its disk's expected content (record_instant read it).
    attached = {where for disks in machine.instants.values() for where, i in disks.items() if not i.detached}
    for where in attached:
        _save_old(machine, where, 0, -(-len(machine.expected[where]) // GRANULE))
    for disks in machine.instants.values():
        for instant in disks.values():
            instant.detached = True


def forget_instant(machine: _Machine, snapshot_uuid: str) -> None:
    """Drop a snapshot's instant; the old granules only it needed go."""
    for instant in machine.instants.pop(snapshot_uuid, {}).values():
        for slot in instant.saved.values():
            machine.old_granules.release(slot)


def content_at(machine: _Machine, instant: _Instant, where: Slot) -> bytes:
    """The content of the disk at ``where`` at ``instant``: today's, with the granules overwritten since put back."""
    kept = machine.old_granules
    if instant.detached:
        return b"".join(kept.read(instant.saved[granule]) for granule in range(-(-instant.size // GRANULE)))
    current = machine.expected[where]
    pieces = []
    done = 0
    for granule in sorted(instant.saved):
        start = granule * GRANULE
        pieces += [current.read(done, start - done), kept.read(instant.saved[granule])]
        done = start + GRANULE
    pieces.append(current.read(done, instant.size - done))
    return b"".join(pieces)


def _save_old(machine: _Machine, where: Slot, first: int, end: int) -> None:
    """Save granules ``[first, end)`` of ``where`` for every instant that has not saved them yet."""
    waiting = [disks[where] for disks in machine.instants.values() if where in disks and not disks[where].detached]
    if not waiting:
        return
    model = machine.expected[where]
    for granule in range(first, end):
        lacking = [instant for instant in waiting if granule not in instant.saved]
        if lacking:
            slot = machine.old_granules.keep(model.read(granule * GRANULE, GRANULE), len(lacking))  # one copy
            for instant in lacking:
                instant.saved[granule] = slot


def slot(machine: _Machine, where: Slot) -> _Attachment:
    """The hard disk attached at ``where``.

    Raises:
        ConfigurationError: No hard disk there.
    """
    for attachment in machine.hard_disks():
        if (attachment.controller, attachment.port, attachment.device) == where:
            return attachment
    raise ConfigurationError(f"{machine.name} has no disk at {where[0]} port {where[1]}")


def content(kind: str, size: int, seed: int) -> Iterator[bytes]:
    """A new disk's content, 1 MiB at a time: ``"mixed"``, ``"random"`` or zeros."""
    if kind == "mixed":
        yield from mixed_content(size, seed=seed)
    elif kind == "random":
        rng = random.Random(seed)
        for _ in range(size // MIB):
            yield rng.randbytes(MIB)
    else:
        for _ in range(size // MIB):
            yield bytes(MIB)


def merge(locks: Locks, machine: _Machine, parent: str, child: str, op: Operation, number: int, count: int,
          block_delay: float) -> None:
    """Merge ``child`` into ``parent`` while the guest may keep writing to ``child``."""
    with locks.disk(machine):
        child_image = image(machine, child)
        parent_image = image(machine, parent)
        indexes = [i for i, entry in enumerate(child_image.block_map) if entry != 0xFFFFFFFF]
        machine.merging[child] = set()
    for done, index in enumerate(indexes):
        with locks.disk(machine):
            machine.merging[child].discard(index)
            parent_image.write(index * VDI_BLOCK_SIZE, child_image.read_block(index))
        op.percent = int(100 * (number + (done + 1) / max(1, len(indexes))) / count) - 1
        if block_delay:
            time.sleep(block_delay)
    with locks.disk_then_host(machine):
        # Blocks the guest wrote during the copy, then the switch, in one step.
        for index in sorted(machine.merging.pop(child)):
            parent_image.write(index * VDI_BLOCK_SIZE, child_image.read_block(index))
        for attachment in [*machine.attachments, *(a for s in machine.snapshots.values() for a in s.attachments)]:
            if attachment.medium == child:
                attachment.medium = parent
        for grandchild in machine.media[child].children:
            image(machine, grandchild).rebase(parent_image)
            machine.media[grandchild].parent = parent
            machine.media[parent].children.append(grandchild)
        machine.media[child].children = []
        drop_medium(machine, child)


def merge_forward(locks: Locks, machine: _Machine, parent: str, child: str, op: Operation, number: int, count: int,
                  block_delay: float) -> None:
    """Merge ``parent`` forward into its only ``child``, which takes its place in the chain.

    The child's uuid and file survive; the parent's go. Blocks the guest has
    written to the child meanwhile are the newer ones and stay.
    """
    with locks.disk(machine):
        parent_image = image(machine, parent)
        child_image = image(machine, child)
        indexes = [i for i, entry in enumerate(parent_image.block_map) if entry != 0xFFFFFFFF]
    for done, index in enumerate(indexes):
        with locks.disk(machine):
            if child_image.block_map[index] == 0xFFFFFFFF:
                child_image.write(index * VDI_BLOCK_SIZE, parent_image.read_block(index))
        op.percent = int(100 * (number + (done + 1) / max(1, len(indexes))) / count) - 1
        if block_delay:
            time.sleep(block_delay)
    with locks.disk_then_host(machine):
        grandparent = machine.media[parent].parent
        if grandparent is not None:
            child_image.rebase(image(machine, grandparent))
            machine.media[grandparent].children.append(child)
        machine.media[child].parent = grandparent
        machine.media[parent].children = []
        drop_medium(machine, parent)
