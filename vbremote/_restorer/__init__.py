"""Restoring archives: the plan, the journal, the apply pipeline, and registering the VM.

The package is built by steps, each in a module of its own:

- :mod:`._source`: what an archive restores (:class:`RestoreSource`), whoever made it;
  :func:`source_from_archive` builds it from a vbremote archive, its settings checked.
- :mod:`._rewrite`: the settings and disk-image rewrites of a restore (dropped
  state, CPU portability level, moved files, a new identity for a copy).
"""

from __future__ import annotations

from ._source import RestoreSource, SourceFile, source_from_archive

__all__ = ["RestoreSource", "SourceFile", "source_from_archive"]
