"""Choosing a VM at the terminal, as the PowerShell tool's menu did, and remembering the choice.

With no VM named and a person at the terminal, the command lists the VMs and
asks for a number. The default is the VM chosen last time (kept in
``STATE_DIR/cli.json``); with exactly two VMs it is the *other* one, since
people with two VMs tend to alternate between them.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import click
from rich.table import Table

from ._app import App

__all__ = ["choose_vm", "confirm", "default_choice", "remember"]

_STATE_FILE = "cli.json"


def _state(app: App) -> dict[str, object]:
    try:
        data = json.loads((app.state_dir() / _STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def remember(app: App, vm: str) -> None:
    """Record the VM chosen (atomically; a failure to write is only logged)."""
    folder = app.state_dir()
    data = _state(app)
    data["last_vm"] = vm
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".cli-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
        Path(tmp).replace(folder / _STATE_FILE)


def default_choice(names: Sequence[str], last: str | None) -> int:
    """The index offered first: with two VMs the one not chosen last, else the last choice, else the first."""
    if last in names:
        index = names.index(last)
        return 1 - index if len(names) == 2 else index
    return 0


def choose_vm(app: App, names: Sequence[str], *, purpose: str, states: Sequence[str] | None = None) -> str:
    """Ask which VM, at the terminal; remember the answer.

    Args:
        app: The run.
        names: The VMs to choose from.
        purpose: What the VM is for (``"snapshot"`` …), shown in the question.
        states: Each VM's state, shown beside its name.

    Raises:
        click.UsageError: No terminal (name a VM), or nothing to choose from.
    """
    if not names:
        raise click.UsageError(f"there is no VM to {purpose}")
    if not app.interactive:
        raise click.UsageError(f"name a VM to {purpose} (there is no terminal to choose at)")
    last = _state(app).get("last_vm")
    default = default_choice(names, last if isinstance(last, str) else None)
    table = Table(title=f"VMs to {purpose}", show_edge=False)
    table.add_column("#", justify="right")
    table.add_column("VM")
    if states is not None:
        table.add_column("state")
    for index, name in enumerate(names, start=1):
        table.add_row(str(index), name, *([states[index - 1]] if states is not None else []))
    app.stderr.print(table)
    number = click.prompt(
        f"Which VM to {purpose}", type=click.IntRange(1, len(names)), default=default + 1, err=True
    )
    chosen = names[number - 1]
    remember(app, chosen)
    return chosen


def confirm(app: App, question: str, *, yes: bool) -> None:
    """Ask before a change; ``--yes`` answers for scripts.

    Raises:
        click.UsageError: No terminal and no ``--yes``.
        click.Abort: The person said no.
    """
    if yes:
        return
    if not app.interactive:
        raise click.UsageError("pass --yes to confirm (there is no terminal to ask at)")
    if not click.confirm(question, default=False, err=True):
        raise click.Abort("not confirmed: nothing was changed")
