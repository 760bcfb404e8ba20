"""The VirtualBox patch release each version profile models, and the behaviours that depend on it.

A profile (``"6.1"``, ``"7.0"``, ``"7.1"``, ``"7.2"``) names a release line;
behaviour changed within lines too, so each profile models one patch release:
the one whose source the simulator's behaviour was read from and is cited
against. ``IVirtualBox.version`` reports it.

- 6.1: 6.1.38 (the 6.1.38 release tree).
- 7.0: 7.0.18 (the 7.0.18 release tree), after the 7.0.10 change below.
  ``"7.0.6"`` selects the 7.0 profile as it was before that change (the 7.0.6
  release tree).
- 7.1: 7.1.12 (the 7.1.12 release tree).
- 7.2: 7.2.18 (the public VirtualBox source tree, whose ``Version.kmk`` says
  7.2.18).

What depends on the patch release:

- From 7.0.10 on, ``SessionMachine::takeSnapshot``
  (src/VBox/Main/src-server/SnapshotImpl.cpp) refuses ``fPause = false``
  unless the machine is Running ("Cannot take a live snapshot of a virtual
  machine unless it is running.", ``VBOX_E_INVALID_VM_STATE``); 6.1.38 and
  7.0.6 have no such check (a Paused machine then goes to
  ``OnlineSnapshotting``, any offline one to ``Snapshotting``).
- ``i_takeSnapshotHandler`` (SnapshotImpl.cpp) copies the NVRAM file for
  every snapshot when it exists; from 7.1 (7.1.4, 7.1.6, 7.1.12, 7.2) only
  for a machine whose firmware is not BIOS.
- ``Snapshot::i_sharesSavedStateFile`` (SnapshotImpl.cpp) decides whether
  deleting a snapshot deletes its saved-state file (the machine's own state
  file is always kept). 6.1.38 walks the tree recursively and skips the
  deleted snapshot together with everything below it, so a state file that
  only a descendant shares is deleted. 7.0.x (7.0.2 to 7.0.18) and 7.1.4/7.1.6
  walk it iteratively but compare the snapshot to skip with the first
  snapshot (``this``) rather than with each one: deleting the first snapshot
  deletes a state file others still share, and deleting any other never
  deletes its own. 7.1.12 and 7.2 compare each snapshot: a state file goes
  exactly when no other snapshot uses it.
"""

from __future__ import annotations

__all__ = [
    "EARLIER_RELEASES",
    "RELEASES",
    "Release",
    "live_snapshot_needs_running",
    "nvram_copy_skips_bios",
    "parse",
    "resolve",
    "state_file_check",
]

#: The patch release each profile models.
RELEASES = {"6.1": "6.1.38", "7.0": "7.0.18", "7.1": "7.1.12", "7.2": "7.2.18"}
#: Other releases a simulated host can be made to be, with the profile they belong to.
EARLIER_RELEASES = {"7.0.6": "7.0"}

Release = tuple[int, int, int]


def resolve(version: str) -> tuple[str, str] | None:
    """The (profile, release) that ``version`` (a profile or a release named here) selects, else ``None``."""
    if version in RELEASES:
        return version, RELEASES[version]
    if version in EARLIER_RELEASES:
        return EARLIER_RELEASES[version], version
    return None


def parse(release: str) -> Release:
    """``"7.0.18"`` as ``(7, 0, 18)``."""
    major, minor, build = (int(part) for part in release.split("."))
    return major, minor, build


def live_snapshot_needs_running(release: str) -> bool:
    """Whether ``takeSnapshot`` refuses ``fPause = false`` for a machine that is not Running (7.0.10+)."""
    return parse(release) >= (7, 0, 10)


def nvram_copy_skips_bios(release: str) -> bool:
    """Whether a snapshot of a BIOS machine gets no NVRAM copy (7.1 on)."""
    return parse(release) >= (7, 1, 0)


def state_file_check(release: str) -> str:
    """How ``Snapshot::i_sharesSavedStateFile`` skips the deleted snapshot: ``"subtree"``, ``"first"`` or ``"each"``."""
    if parse(release) < (7, 0, 0):
        return "subtree"
    return "first" if parse(release) < (7, 1, 12) else "each"
