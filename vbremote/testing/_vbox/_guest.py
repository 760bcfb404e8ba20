"""The guest: a thread per running VM that writes to its disks and records what it wrote.

Each write happens under the machine's disk lock, in the states where a
guest runs (:data:`WRITING_STATES`); what it wrote goes to the machine's
``expected`` model too (saving first what snapshot instants still need of
it, see :func:`._media.guest_write`), and to the merge bookkeeping of a disk
being merged.
"""

from __future__ import annotations

import random
import threading

from .._images import MIB
from .._vdi import VDI_BLOCK_SIZE
from . import _media
from ._locks import Locks
from ._model import GuestWorkload, _Guest, _Machine

__all__ = ["WRITING_STATES", "start_guest", "stop_guest"]

#: The machine states in which the guest writes (paused or held for a snapshot, it does not).
WRITING_STATES = ("Running", "LiveSnapshotting", "DeletingSnapshotOnline")


def start_guest(locks: Locks, machine: _Machine, workload: GuestWorkload) -> None:
    """Start the machine's guest writer (stopping a previous one)."""
    stop_guest(machine)
    guest = _Guest(workload)
    with locks.disk(machine):
        for attachment in machine.hard_disks():
            _media.expected(machine, (attachment.controller, attachment.port, attachment.device))
    guest.thread = threading.Thread(target=_guest_loop, args=(locks, machine, guest), daemon=True,
                                    name=f"vbox-sim guest {machine.name}")
    machine.guest = guest
    guest.thread.start()


def stop_guest(machine: _Machine) -> None:
    """Stop the machine's guest writer and wait for it (unless called from it)."""
    guest = machine.guest
    if guest is not None and guest.thread is not None:
        guest.stop.set()
        if guest.thread is not threading.current_thread():
            guest.thread.join()


def _guest_loop(locks: Locks, machine: _Machine, guest: _Guest) -> None:
    workload = guest.workload
    rng = random.Random(workload.seed)
    interval = 1.0 / workload.rate
    while not guest.stop.wait(interval):
        if machine.state not in WRITING_STATES:
            continue  # a paused guest (or one held for a snapshot) does not write
        with locks.disk(machine):
            if machine.state not in WRITING_STATES:
                continue
            disks = machine.hard_disks()
            if not disks:
                continue
            attachment = rng.choice(disks)
            assert attachment.medium is not None
            image = _media.image(machine, attachment.medium)
            offset = _guest_offset(guest, rng, image.size)
            data = rng.randbytes(workload.write_size)
            image.write(offset, data)
            _media.guest_write(machine, (attachment.controller, attachment.port, attachment.device), offset, data)
            dirty = machine.merging.get(attachment.medium)
            if dirty is not None:
                first, last = offset // VDI_BLOCK_SIZE, (offset + len(data) - 1) // VDI_BLOCK_SIZE
                dirty.update(range(first, last + 1))
            guest.writes += 1


def _guest_offset(guest: _Guest, rng: random.Random, size: int) -> int:
    step = guest.workload.write_size
    slots = size // step
    if guest.workload.pattern == "sequential":
        guest.cursor = (guest.cursor + 1) % slots
        return guest.cursor * step
    if guest.workload.pattern == "hot" and rng.random() < 0.9:
        return rng.randrange(max(1, min(slots, (4 * MIB) // step))) * step
    return rng.randrange(slots) * step
