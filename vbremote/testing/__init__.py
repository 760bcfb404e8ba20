"""Test doubles and checks for code that uses vbremote.

- :func:`check_transport` proves that a :class:`vbremote.Transport` works.
- :func:`make_vdi` and :func:`guest_write` make and change real VDI images
  (through qemu's tools) for realistic tests.
"""

from __future__ import annotations

from ._images import MIB, guest_write, make_vdi, mixed_content, qemu_tools_available
from ._transport_check import TransportCheckFailed, check_transport

__all__ = [
    "MIB",
    "TransportCheckFailed",
    "check_transport",
    "guest_write",
    "make_vdi",
    "mixed_content",
    "qemu_tools_available",
]
