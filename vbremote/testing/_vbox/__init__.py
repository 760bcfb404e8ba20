"""The simulated VirtualBox host, by concern.

The layers, each importing only those below it:

- ``_simulator``: :class:`SimulatedVirtualBox`, the world plus its manager;
- ``_com``: the vboxapi-shaped COM objects and ``VirtualBoxManager``;
- ``_world``: the host's operations (lifecycle, snapshots, settings calls),
  composing the modules below;
- ``_sessions`` (locks, session checks, the machine-state table),
  ``_persistence`` (``.vbox`` files and ``VirtualBox.xml``), ``_media``
  (images, differencing chains, merges), ``_guest`` (the writing guest),
  ``_operations`` (progress, cancel, hang);
- ``_locks`` (the host lock, disk locks and their order), ``_model`` (the
  records and public values), ``_constants`` (the profiles' COM constants).
"""

from __future__ import annotations

from ._com import VirtualBoxManager
from ._constants import PROFILES
from ._model import Fault, GuestWorkload, SimulatedVBoxError, Timing
from ._simulator import SimulatedVirtualBox

__all__ = ["PROFILES", "Fault", "GuestWorkload", "SimulatedVBoxError", "SimulatedVirtualBox", "Timing",
           "VirtualBoxManager"]
