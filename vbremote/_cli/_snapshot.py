"""``vbremote snapshot``: the Snapshotter from the command line."""

from __future__ import annotations

from typing import Any, Literal

import click

from .._config import MODES
from .._models import SnapshotMode
from .._snapshotter import SnapshotResult, Snapshotter
from ._app import App
from ._choose import choose_vm
from ._commands import _archive_doc, _monitored, _repo_detail, _size, cli, json_option, pass_app

__all__ = ["snapshot"]


def _result_doc(vm: str, result: SnapshotResult) -> dict[str, Any]:
    stats = result.stats
    return {
        "vm": vm,
        "archive": _archive_doc(result.archive),
        "mode": result.mode.value,
        "vm_state": result.vm_state.value,
        "leftovers_removed": [s.name for s in result.leftovers],
        "stats": {
            "bytes_read": stats.bytes_read,
            "bytes_new": stats.bytes_new,
            "bytes_stored": stats.bytes_stored,
            "chunks": stats.chunks,
            "chunks_new": stats.chunks_new,
            "chunks_zero": stats.chunks_zero,
            "seconds_snapshot": stats.seconds_snapshot,
            "seconds_archive": stats.seconds_archive,
            "seconds_merge": stats.seconds_merge,
            "seconds_transient": stats.seconds_transient,
        },
    }


@cli.command()
@click.argument("vm_names", metavar="[VM]...", nargs=-1)
@click.option(
    "--mode",
    type=click.Choice(MODES),
    help="auto (online if running, else offline), online, offline or migrate (default: the VM's mode in the config).",
)
@click.option("--label", "labels", multiple=True, metavar="LABEL", help="A label for the archive (repeatable).")
@json_option
@pass_app
def snapshot(app: App, vm_names: tuple[str, ...], mode: str | None, labels: tuple[str, ...]) -> None:
    """Snapshot VMs into the repository, one after the other.

    A running VM keeps running (online); a powered-off or saved one is
    archived as it is (offline); migrate saves a running VM's state, archives
    it and leaves it saved. The VM's labels from the config are added to
    those given. Without a VM at a terminal, it asks which one.
    """
    host = app.host()
    if not vm_names:
        machines = sorted(host.vms(), key=lambda m: m.name)
        vm_names = (
            choose_vm(app, [m.name for m in machines], purpose="snapshot", states=[m.state.value for m in machines]),
        )
    repo = app.open_repository()
    snapshotter = Snapshotter(host, repo, state_dir=app.state_dir())
    documents = []
    with _monitored(app, "snapshot", vms=list(vm_names), **_repo_detail(app)) as run:
        for vm in vm_names:
            settings = app.config.vm(vm)
            chosen = mode or settings.mode
            how: SnapshotMode | Literal["auto"] = "auto" if chosen == "auto" else SnapshotMode(chosen)
            with app.progress() as progress:
                result = snapshotter.take(vm, how, labels=(*settings.labels, *labels), progress=progress)
            documents.append(_result_doc(vm, result))
            stats = result.stats
            app.say(
                f"{vm}: {result.archive.name} ({result.mode.value}); read {_size(stats.bytes_read)},"
                f" new {_size(stats.bytes_new)}, stored {_size(stats.bytes_stored)};"
                f" the transient snapshot lasted {stats.seconds_transient:.1f} s; the VM is {result.vm_state.value}"
            )
            for leftover in result.leftovers:
                app.note(f"{vm}: removed {leftover.name}, left by an earlier run that crashed")
        doc = {"repository": app.repository_config().name, "snapshots": documents}
        run.result = doc
    app.emit(doc)
