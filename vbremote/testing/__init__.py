"""Test doubles and checks for code that uses vbremote.

- :class:`SimulatedVirtualBox` is a VirtualBox host with real files behind
  vboxapi's surface (:meth:`SimulatedVirtualBox.manager`), with version
  profiles, sessions, progress, fault injection and a guest that writes while
  its VM runs; :class:`vbremote.VirtualBoxHost` runs on it unchanged.
- :func:`check_transport` proves that a :class:`vbremote.Transport` works.
- :func:`make_vdi` and :func:`guest_write` make and change real VDI images
  (through qemu's tools) for realistic tests.
"""

from __future__ import annotations

from ._images import MIB, guest_write, make_vdi, mixed_content, qemu_tools_available
from ._transport_check import TransportCheckFailed, check_transport
from ._vbox import PROFILES as VIRTUALBOX_PROFILES
from ._vbox import Fault, GuestWorkload, SimulatedVBoxError, SimulatedVirtualBox, Timing, VirtualBoxManager

__all__ = [
    "MIB",
    "VIRTUALBOX_PROFILES",
    "Fault",
    "GuestWorkload",
    "SimulatedVBoxError",
    "SimulatedVirtualBox",
    "Timing",
    "TransportCheckFailed",
    "VirtualBoxManager",
    "check_transport",
    "guest_write",
    "make_vdi",
    "mixed_content",
    "qemu_tools_available",
]
