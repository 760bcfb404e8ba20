"""Fixtures for tests over a rate-limited link into a network namespace (benchmarks/_netns.py, _restoring.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _netns import NetnsLink, NetnsSSHD, NetnsUnavailable
from _restoring import restore

__all__ = ["NetnsLink", "NetnsSSHD", "NetnsUnavailable", "link_with_sshd", "restore"]


def link_with_sshd(rate_mbit: float, root: Path) -> Iterator[tuple[NetnsLink, NetnsSSHD]]:
    """A link and an sshd in its namespace; skips the test when namespaces cannot be made here."""
    try:
        with NetnsLink.create(rate_mbit) as link, NetnsSSHD.start(link, root) as sshd:
            yield link, sshd
    except NetnsUnavailable as error:
        pytest.skip(str(error))
