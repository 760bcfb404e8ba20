"""Restoring archives: the plan, the journal, the apply pipeline, and registering the VM.

The package is built by steps, each in a module of its own:

- :mod:`._source`: what an archive restores (:class:`RestoreSource`), whoever made it.
"""

from __future__ import annotations

from ._source import RestoreSource, SourceFile

__all__ = ["RestoreSource", "SourceFile"]
