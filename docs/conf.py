"""Sphinx configuration for vbremote's documentation."""

from __future__ import annotations

project = "vbremote"
author = "the vbremote developers"
copyright = "2026, the vbremote developers"  # noqa: A001

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx_click",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
intersphinx_mapping = {}
nitpicky = False
html_theme = "alabaster"


def _hide_private_bases(app: object, name: str, obj: object, options: object, bases: list[type]) -> None:
    # A public class built on a private base (the simulator's world) shows ``object`` instead.
    bases[:] = [b for b in bases if not any(part.startswith("_") for part in b.__module__.split("."))] or [object]


def setup(app: object) -> None:
    app.connect("autodoc-process-bases", _hide_private_bases)  # type: ignore[attr-defined]
