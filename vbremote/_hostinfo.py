"""Facts about the host vbremote runs on, recorded in snapshots and checked by restores."""

from __future__ import annotations

import contextlib

__all__ = ["cpu_vendor"]


def cpu_vendor() -> str | None:
    """This host's CPU vendor as the kernel reports it (``vendor_id``; ``CPU implementer`` on ARM), or None."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() in ("vendor_id", "CPU implementer"):
                return value.strip() or None
    return None
