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
