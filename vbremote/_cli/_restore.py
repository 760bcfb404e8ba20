"""``vbremote restore`` and ``vbremote drill``: the Restorer from the command line."""

from __future__ import annotations

import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import click
from rich.table import Table

from .._errors import ArchiveNotFound, RestorePreflightFailed, VBRemoteError
from .._models import ArchiveInfo, MachineState
from .._repository import Repository
from .._restorer import ImageDrive, RestorePlan, Restorer, RestoreResult
from .._restorer._vm import machine_folder_name
from ._app import App, CommandFailed, exit_code_for
from ._choose import choose_vm, confirm
from ._commands import _archive_doc, _monitored, _repo_detail, _size, cli, json_option, pass_app

__all__ = ["drill", "restore"]


def _newest(repo: Repository, vm: str) -> ArchiveInfo:
    found = repo.archives(vm=vm)
    if not found:
        raise ArchiveNotFound(f"no archive of VM {vm!r} in the repository", location=repo.transport.location)
    return max(found, key=lambda a: a.time)


def _pick_archive(app: App, repo: Repository, given: str | None) -> ArchiveInfo:
    """An archive name, else a VM's newest archive; at a terminal without either, ask (newest first offered)."""
    if given is not None:
        try:
            return repo.archive(given)
        except ArchiveNotFound:
            return _newest(repo, given)
    names = sorted({a.vm_name for a in repo.archives()})
    vm = choose_vm(app, names, purpose="restore")
    archives = sorted(repo.archives(vm=vm), key=lambda a: a.time, reverse=True)
    table = Table(title=f"archives of {vm}, newest first", show_edge=False)
    table.add_column("#", justify="right")
    for column in ("archive", "time (UTC)", "mode"):
        table.add_column(column)
    for index, a in enumerate(archives, start=1):
        table.add_row(str(index), a.name, f"{a.time:%Y-%m-%d %H:%M:%S}", a.mode.value)
    app.stderr.print(table)
    number = click.prompt("Which archive", type=click.IntRange(1, len(archives)), default=1, err=True)
    return archives[number - 1]


def _plan_doc(plan: RestorePlan) -> dict[str, Any]:
    return {
        "target": str(plan.target),
        "bytes_to_fetch": plan.bytes_to_fetch,
        "bytes_to_write": plan.bytes_to_write,
        "bytes_reused": plan.bytes_reused,
        "resumed": plan.resumed,
        "files": [
            {
                "path": f.source.target_path,
                "size": f.source.size,
                "exists": f.local_size is not None,
                "blocks_reused": f.blocks_reused,
                "blocks_copied": f.blocks_copied,
                "blocks_fetched": f.blocks_fetched,
                "blocks_zero": f.blocks_zero,
                "bytes_to_fetch": f.bytes_to_fetch,
                "bytes_to_write": f.bytes_to_write,
            }
            for f in plan.files
        ],
        "problems": [{"code": p.code, "message": p.message, "remedy": p.remedy} for p in plan.problems],
        "ejected": _ejected_doc(plan.ejected),
    }


def _ejected_doc(drives: tuple[ImageDrive, ...]) -> list[dict[str, Any]]:
    return [
        {"image": str(d.image), "kind": d.kind, "uuid": d.uuid, "controller": d.controller, "port": d.port,
         "device": d.device, "snapshot": d.snapshot}
        for d in drives
    ]


def _show_plan(app: App, archive: ArchiveInfo, plan: RestorePlan, as_new: str | None) -> None:
    what = f"as the new VM {as_new!r}" if as_new else f"VM {archive.vm_name!r}"
    table = Table(title=f"restore plan: {archive.name} -> {what} in {plan.target}")
    for column in ("file", "size", "reused", "copied", "fetched", "to fetch", "to write"):
        table.add_column(column)
    for f in plan.files:
        table.add_row(
            f.source.target_path + ("" if f.local_size is not None else " (new)"),
            _size(f.source.size),
            str(f.blocks_reused),
            str(f.blocks_copied),
            str(f.blocks_fetched),
            _size(f.bytes_to_fetch),
            _size(f.bytes_to_write),
        )
    console = app.stdout if not app.json else app.stderr
    console.print(table)
    console.print(
        f"{_size(plan.bytes_to_fetch)} travel from the repository, {_size(plan.bytes_reused)} are already in"
        f" place, {_size(plan.bytes_to_write)} are written."
        + ("" if as_new else " The old VM's files that the archive does not have are removed.")
        + (" An interrupted restore of this archive continues." if plan.resumed else ""),
        markup=False,
    )
    for drive in plan.ejected:
        console.print(f"missing image {drive.image}: the {drive.describe()} is restored empty", markup=False)
    for problem in plan.problems:
        console.print(f"problem ({problem.code}): {problem.message}; {problem.remedy}", markup=False)


def _result_doc(result: RestoreResult) -> dict[str, Any]:
    stats = result.stats
    vm = result.vm
    return {
        "vm": None if vm is None else {"name": vm.name, "uuid": vm.uuid, "state": vm.state.value},
        "settings_file": str(result.settings_file),
        "removed": [str(p) for p in result.removed],
        "resumed": result.resumed,
        "ejected": _ejected_doc(result.ejected),
        "stats": {
            "bytes_fetched": stats.bytes_fetched,
            "bytes_copied": stats.bytes_copied,
            "bytes_written": stats.bytes_written,
            "bytes_verified": stats.bytes_verified,
            "seconds": stats.seconds,
        },
    }


@cli.command()
@click.argument("what", metavar="[VM|ARCHIVE]", required=False)
@click.option("--target", type=click.Path(file_okay=False, path_type=Path), help="The VM folder to restore into.")
@click.option("--as-new", metavar="NAME", help="Restore as a new VM of this name (new uuids), beside the current one.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation (for scripts).")
@click.option("--power-off", is_flag=True, help="Power the VM off first if it runs.")
@click.option("--discard-state", is_flag=True, help="Restore a saved-state archive powered off.")
@click.option("--cpu-portability-level", type=click.IntRange(0, 3),
              help="The CPU portability level the restored VM gets (accepts a saved state from another host).")
@click.option("--verify", type=click.Choice(["written", "full", "none"]), default="written", show_default=True,
              help="Read back the blocks written (written), every block (full), or none.")
@click.option("--allow-host-references", is_flag=True,
              help="Keep what the archive's settings give the VM of this host (shared folders, serial ports on host "
                   "files, ...); only for archives whose author you trust.")
@click.option("--eject-missing-images", is_flag=True,
              help="Restore the DVD and floppy drives whose images are missing on this host empty.")
@json_option
@pass_app
def restore(
    app: App,
    what: str | None,
    target: Path | None,
    as_new: str | None,
    yes: bool,
    power_off: bool,
    discard_state: bool,
    cpu_portability_level: int | None,
    verify: Literal["written", "full", "none"],
    allow_host_references: bool,
    eject_missing_images: bool,
) -> None:
    """Restore a VM from an archive: only the blocks that differ travel.

    Give an archive's name, or a VM's name for its newest archive; without
    either at a terminal, choose the VM and then the archive (newest first).
    The plan (what travels, what is reused, what is written) is shown and
    must be confirmed before anything is written (--yes for scripts).
    Settings that give the VM something of this host (a shared folder, a
    serial port on a host file, VBoxInternal ExtraData ...) are refused
    unless --allow-host-references is given.
    """
    host = app.host()
    repo = app.open_repository()
    archive = _pick_archive(app, repo, what)
    restorer = Restorer(host, repo, state_dir=app.state_dir())
    seeds = app.config.vm(archive.vm_name).seeds
    with _monitored(app, "restore", vm=archive.vm_name, archive=archive.name, **_repo_detail(app)) as run:
        with app.progress() as progress:
            plan = restorer.plan(archive, target, seeds, power_off=power_off, discard_state=discard_state,
                                 cpu_portability_level=cpu_portability_level, as_new=as_new, progress=progress,
                                 eject_missing_images=eject_missing_images,
                                 allow_host_references=allow_host_references)
        _show_plan(app, archive, plan, as_new)
        if plan.problems:
            codes = ", ".join(p.code for p in plan.problems)
            raise RestorePreflightFailed(
                f"the restore of {archive.name!r} is refused ({codes}): see the problems above",
                archive=archive.name,
                problems=plan.problems,
            )
        confirm(app, f"Restore {archive.name} into {plan.target}?", yes=yes)
        with app.progress() as progress:
            result = restorer.restore(archive, target, power_off=power_off, seeds=seeds,
                                      discard_state=discard_state, cpu_portability_level=cpu_portability_level,
                                      verify=verify, as_new=as_new, progress=progress,
                                      eject_missing_images=eject_missing_images,
                                      allow_host_references=allow_host_references)
        doc = {
            "repository": app.repository_config().name,
            "archive": _archive_doc(archive),
            "plan": _plan_doc(plan),
            **_result_doc(result),
        }
        run.result = doc
    app.emit(doc)
    state = result.vm.state.value if result.vm else "not registered"
    for drive in result.ejected:
        app.say(f"The {drive.describe()} is empty: its image {drive.image} is missing on this host.")
    app.say(
        f"Restored {archive.name} into {plan.target}: fetched {_size(result.stats.bytes_fetched)},"
        f" wrote {_size(result.stats.bytes_written)}; the VM is {state}."
    )


# -- drill --------------------------------------------------------------------------


@cli.command()
@click.argument("vm", required=False)
@click.option("--run-seconds", type=click.FloatRange(0, 3600), default=10.0, show_default=True,
              help="How long the restored VM must keep running.")
@click.option("--allow-host-references", is_flag=True,
              help="Restore settings that reach outside the VM folder (shared folders, host serial ports …).")
@json_option
@pass_app
def drill(app: App, vm: str | None, run_seconds: float, allow_host_references: bool) -> None:
    """A restore drill: the VM's newest archive restored as a new VM, run, verified, removed.

    Steps: restore as a new VM into a scratch folder (every block read back
    and verified against the archive), start it headless (a saved state
    resumes), check that it keeps running for --run-seconds, power it off,
    unregister it and remove its folder. A failed drill names the step that
    failed; the scratch VM is removed either way.
    """
    host = app.host()
    repo = app.open_repository()
    if vm is None:
        vm = choose_vm(app, sorted({a.vm_name for a in repo.archives()}), purpose="drill")
    archive = _newest(repo, vm)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    # The VM's name comes from the archive: the scratch folder is made from it as VirtualBox would
    # make a new machine's, so it is always one new folder below the default machine folder.
    name = machine_folder_name(f"{archive.vm_name}-drill-{stamp}")
    folder = host.default_machine_folder / name
    made_here = not folder.exists()
    steps: list[dict[str, Any]] = []
    registered: str | None = None
    failure: tuple[str, BaseException] | None = None

    def step(label: str) -> _Step:
        return _Step(label, steps)

    with _monitored(app, "drill", vm=vm, archive=archive.name, **_repo_detail(app)) as run:
        try:
            with step("restore"), app.progress() as progress:
                result = Restorer(host, repo, state_dir=app.state_dir()).restore(
                    archive, folder, as_new=name, verify="full", progress=progress,
                    allow_host_references=allow_host_references)
                assert result.vm is not None
                registered = result.vm.uuid
            with step("start"):
                host.start(registered, front_end="headless")
            with step("run"):
                deadline = time.monotonic() + run_seconds
                while True:
                    state = host.state(registered)
                    if state is not MachineState.RUNNING:
                        raise CommandFailed(f"the restored VM is {state.value}, not Running")
                    if time.monotonic() >= deadline:
                        break
                    time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            with step("power off"):
                host.power_off(registered)
        except (VBRemoteError, CommandFailed) as exc:
            failure = (steps[-1]["step"], exc)
        finally:
            try:
                with step("remove"):
                    if registered is not None:
                        if not host.state(registered).is_off:
                            host.power_off(registered)
                        host.unregister(registered)
                    if made_here and folder.exists():
                        shutil.rmtree(folder)
            except (VBRemoteError, OSError) as exc:
                if failure is None:
                    failure = ("remove", exc)
        doc = {
            "repository": app.repository_config().name,
            "vm": vm,
            "archive": _archive_doc(archive),
            "scratch_vm": name,
            "ok": failure is None,
            "failed_step": failure[0] if failure else None,
            "error": str(failure[1]) if failure else None,
            "steps": steps,
        }
        run.result = doc
        app.emit(doc)
        for s in steps:
            app.say(f"{s['step']:<10} {'ok' if s['ok'] else 'FAILED'}  {s['seconds']:.1f} s  {s['error'] or ''}")
        if failure is not None:
            code = failure[1].exit_code if isinstance(failure[1], CommandFailed) else exit_code_for(failure[1])
            raise CommandFailed(f"the drill of {vm} failed at step {failure[0]!r}: {failure[1]}", exit_code=code)
        app.say(f"Drill of {vm} passed: {archive.name} restored, ran {run_seconds:g} s, verified and removed.")


class _Step:
    """Times one drill step and records whether it failed (the error goes on)."""

    def __init__(self, label: str, steps: list[dict[str, Any]]) -> None:
        self.label = label
        self.steps = steps

    def __enter__(self) -> None:
        self.started = time.monotonic()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.steps.append({
            "step": self.label,
            "ok": exc is None,
            "seconds": time.monotonic() - self.started,
            "error": None if exc is None else str(exc) or type(exc).__name__,
        })
