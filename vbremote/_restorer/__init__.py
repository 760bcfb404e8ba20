"""Restoring archives: the plan, the journal, the apply pipeline, and registering the VM.

The package is built by steps, each in a module of its own:

- :mod:`._source`: what an archive restores (:class:`RestoreSource`), whoever made it;
  :func:`source_from_archive` builds it from a vbremote archive, its settings checked.
- :mod:`._plan`: what each block of each file needs (:func:`make_plan`, :class:`RestorePlan`).
- :mod:`._journal`: the durable record of an interrupted restore (:class:`RestoreState`).
- :mod:`._apply`: copy, fetch, write, journal, size and verify (:func:`apply_plan`).
- :mod:`._vm`: the :class:`Restorer` (preflight, unregister, register, stale
  files, restore as a new VM).
- :mod:`._rewrite`: the settings and disk-image rewrites of a restore (dropped
  state, CPU portability level, moved files, a new identity for a copy,
  ejected images).
- :mod:`._images`: the DVD and floppy images an archive refers to, and which
  of them are missing on this host (:class:`ImageDrive`).
"""

from __future__ import annotations

from ._apply import ApplyStats, Prefetch, apply_plan
from ._images import ImageDrive
from ._journal import JOURNAL_NAME, RestoreFileState, RestoreState
from ._plan import BlockAction, FilePlan, PlanProblem, RestorePlan, make_plan
from ._source import RestoreSource, SourceFile, source_from_archive
from ._vm import Restorer, RestoreResult

__all__ = [
    "JOURNAL_NAME",
    "ApplyStats",
    "BlockAction",
    "FilePlan",
    "ImageDrive",
    "PlanProblem",
    "Prefetch",
    "RestoreFileState",
    "RestorePlan",
    "RestoreResult",
    "RestoreSource",
    "RestoreState",
    "Restorer",
    "SourceFile",
    "apply_plan",
    "make_plan",
    "source_from_archive",
]
