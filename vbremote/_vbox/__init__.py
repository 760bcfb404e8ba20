"""The VirtualBox adapter: the only package that imports vboxapi (and only in ``connect``)."""

from __future__ import annotations

from ._host import LockRetry, VirtualBoxHost

__all__ = ["LockRetry", "VirtualBoxHost"]
