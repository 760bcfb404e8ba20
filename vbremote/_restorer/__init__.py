"""Restoring archives: the plan, the journal, the apply pipeline, and registering the VM.

The package is built by steps, each in a module of its own:

- :mod:`._source`: what an archive restores (:class:`RestoreSource`), whoever made it.
- :mod:`._plan`: what each block of each file needs (:func:`make_plan`, :class:`RestorePlan`).
- :mod:`._journal`: the durable record of an interrupted restore (:class:`RestoreState`).
- :mod:`._apply`: copy, fetch, write, journal, size and verify (:func:`apply_plan`).
"""

from __future__ import annotations

from ._apply import ApplyStats, apply_plan
from ._journal import JOURNAL_NAME, RestoreFileState, RestoreState
from ._plan import BlockAction, FilePlan, PlanProblem, RestorePlan, make_plan
from ._source import RestoreSource, SourceFile

__all__ = [
    "JOURNAL_NAME",
    "ApplyStats",
    "BlockAction",
    "FilePlan",
    "PlanProblem",
    "RestoreFileState",
    "RestorePlan",
    "RestoreSource",
    "RestoreState",
    "SourceFile",
    "apply_plan",
    "make_plan",
]
