"""Development sessions: ``nox -s tests lint typecheck docs demo bench``."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "docs"]
nox.options.reuse_existing_virtualenvs = True

# The interpreter nox runs on (the one scripts/dev.sh set up), whatever its
# minor version: the project needs 3.11 or newer.
PYTHON = None


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite (real borg repositories, a real sshd on loopback, real disk images)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff over the package, tests, benchmarks and this file."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", "vbremote", "tests", "benchmarks", "noxfile.py")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package and on example user code in tests/typing."""
    # The package imports borg only in its worker process, so type checking
    # does not need borg built.
    session.install("--no-deps", "-e", ".")
    session.install(
        "attrs>=23.1", "defusedxml>=0.7.1", "types-defusedxml", "click>=8.1", "rich>=13", "mypy>=1.10"
    )
    session.run("mypy")
    session.run("mypy", "--strict", "tests/typing")


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Sphinx, warnings as errors."""
    session.install("--no-deps", "-e", ".")
    session.install(
        "attrs>=23.1", "defusedxml>=0.7.1", "click>=8.1", "rich>=13", "sphinx>=7", "myst-parser>=2", "sphinx-click>=5"
    )
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The demo: a repository in a temporary folder, a VM-like folder with a real VDI."""
    session.install("-e", ".")
    session.run("python", "-m", "vbremote.demo", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks against the borg CLI on the same data (ratios, not timed tests)."""
    session.install("-e", ".[bench]")
    session.run("python", "benchmarks/bench_repository.py", *session.posargs)
    session.run("python", "benchmarks/bench_prune.py")
    session.run("python", "benchmarks/bench_fetch.py")
    session.run("python", "benchmarks/bench_snapshot.py")
    session.run("python", "benchmarks/bench_restore.py")
