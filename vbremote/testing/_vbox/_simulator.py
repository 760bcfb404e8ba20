"""The public simulated host: the world with its vboxapi-shaped manager."""

from __future__ import annotations

from ._com import VirtualBoxManager
from ._world import World

__all__ = ["SimulatedVirtualBox"]


class SimulatedVirtualBox(World):
    """A simulated VirtualBox host with real files, for tests and demos.

    Args:
        home: The VirtualBox home folder (``VirtualBox.xml`` and ``VirtualBox VMs/``).
            Machines registered there before are loaded.
        version: The version profile: ``"6.1"``, ``"7.0"``, ``"7.1"`` or ``"7.2"``,
            modelling the patch releases 6.1.38, 7.0.18, 7.1.12 and 7.2.18
            (``IVirtualBox.version``); or ``"7.0.6"``, the 7.0 profile before
            7.0.10 (a live snapshot of a VM that is not Running accepted).
        timing: How long operations take.
        workload: What guests write when their VM is started through the API
            (``launchVMProcess``); ``None`` for guests that do not write.

    Use :meth:`manager` for the vboxapi-shaped ``VirtualBoxManager`` that
    :meth:`vbremote.VirtualBoxHost.connect` takes, and the conveniences
    (:meth:`create_vm`, :meth:`start`, :meth:`power_off`, :meth:`guest_content`,
    :meth:`guest_content_at`, :meth:`disk_content`, :meth:`read_image`) to set
    scenes and check results.
    Close it (or use it as a context manager) to stop the guests.

    Raises:
        ConfigurationError: An unknown profile.
    """

    def manager(self) -> VirtualBoxManager:
        """A vboxapi-shaped ``VirtualBoxManager`` for this host."""
        return VirtualBoxManager(simulator=self)
