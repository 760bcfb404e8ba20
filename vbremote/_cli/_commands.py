"""The ``vbremote`` command and its subcommands."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from .. import __version__
from .._errors import ConfigFileError, PruneRefused
from .._models import ArchiveInfo
from .._pruner import Pruner, PruneResult
from .._repository import ENCRYPTION_MODES, Repository
from ._app import App, CommandFailed, exit_code_for, setup_logging
from ._choose import choose_vm
from ._monitor import Run, monitored

__all__ = ["cli"]

pass_app = click.make_pass_decorator(App)


def _set_json(ctx: click.Context, _: click.Parameter, value: bool) -> bool:
    if value:
        ctx.ensure_object(App).json = True
    return value


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--json`` on a subcommand, the same as before it."""
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        expose_value=False,
        callback=_set_json,
        help="Write one JSON document to stdout (see the schemas) and nothing else.",
    )(f)


def _code(exc: BaseException) -> int:
    if isinstance(exc, CommandFailed):
        return exc.exit_code
    if isinstance(exc, click.ClickException):
        return exc.exit_code
    return exit_code_for(exc)


@contextlib.contextmanager
def _monitored(app: App, command: str, **details: Any) -> Iterator[Run]:
    with monitored(command, app.config, app.warn, _code, **details) as run:
        yield run


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The config file (default: $XDG_CONFIG_HOME/vbremote/config.toml, or ~/.config/vbremote/config.toml).",
)
@click.option("--repo", "repo_name", metavar="NAME", help="The repository to use (default: the config's default).")
@click.option("--json", "as_json", is_flag=True, help="Write one JSON document to stdout and nothing else.")
@click.option("-v", "--verbose", count=True, help="More detail on stderr; errors with their traceback.")
@click.option("-q", "--quiet", count=True, help="Only errors on stderr; no progress bars.")
@click.option(
    "--log-file", type=click.Path(dir_okay=False, path_type=Path), help="Also write a detailed log to this file."
)
@click.version_option(__version__, prog_name="vbremote")
@click.pass_context
def cli(
    ctx: click.Context,
    config_path: Path | None,
    repo_name: str | None,
    as_json: bool,
    verbose: int,
    quiet: int,
    log_file: Path | None,
) -> None:
    """External snapshots of VirtualBox VMs in borg repositories.

    The config file names the repositories, the VMs' settings, hooks and
    pings; see the config reference. Exit codes: 0 ok, 1 failure, 2 usage or
    config, 3 repository or transport, 4 VirtualBox, 5 snapshot or restore,
    6 prune refused, 130 interrupted.
    """
    app = ctx.ensure_object(App)
    app.config_path = config_path
    app.repo_name = repo_name
    app.json = app.json or as_json
    app.verbosity = verbose - quiet
    setup_logging(app.verbosity, log_file)
    ctx.call_on_close(app.close)


# -- helpers ------------------------------------------------------------------------


def _time(archive: ArchiveInfo) -> str:
    return archive.time.isoformat()


def _archive_doc(archive: ArchiveInfo, *, files: bool = False) -> dict[str, Any]:
    meta = archive.metadata
    doc: dict[str, Any] = {
        "name": archive.name,
        "id": archive.id,
        "time": _time(archive),
        "vm_name": meta.vm_name,
        "vm_uuid": meta.vm_uuid,
        "mode": meta.mode.value,
        "labels": sorted(meta.labels),
        "size": sum(f.size for f in archive.files),
    }
    if files:
        doc.update(
            host=meta.host,
            vbox_version=meta.vbox_version,
            cpu_vendor=meta.cpu_vendor,
            cpu_portability=meta.cpu_portability,
            files=[
                {"path": f.path, "role": f.role.value, "size": f.size, "chunking": f.chunking.kind}
                for f in archive.files
            ],
        )
    return doc


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _repo_detail(app: App) -> dict[str, Any]:
    settings = app.repository_config()
    return {"repository": settings.name, "location": settings.transport.location}


# -- init ---------------------------------------------------------------------------


@cli.command()
@click.option(
    "--encryption",
    type=click.Choice(ENCRYPTION_MODES),
    help="borg's encryption mode (default: the repository's `encryption` in the config, else repokey).",
)
@json_option
@pass_app
def init(app: App, encryption: str | None) -> None:
    """Create the repository (the one --repo names, or the default one)."""
    settings = app.repository_config()
    mode = encryption or settings.encryption
    borg_sources = ("BORG_PASSPHRASE", "BORG_NEW_PASSPHRASE", "BORG_PASSCOMMAND", "BORG_PASSPHRASE_FD")
    if mode != "none" and settings.passphrase() is None and not any(os.environ.get(v) for v in borg_sources):
        raise ConfigFileError(
            f"encryption {mode!r} needs a passphrase: give repositories.{settings.name} a passphrase_command,"
            " passphrase_env or passphrase_file",
            file=str(app.config.file or ""),
            key=f"repositories.{settings.name}",
        )
    with _monitored(app, "init", **_repo_detail(app)) as run:
        with Repository.init(
            settings.transport,
            encryption=mode,
            passphrase=settings.passphrase(),
            lock_wait=settings.lock_wait,
            base_dir=settings.borg_base_dir,
        ) as repo:
            doc = {
                "repository": settings.name,
                "location": settings.transport.location,
                "id": repo.id,
                "encryption": repo.encryption,
                "block_size": repo.block_size,
            }
        run.result = doc
    app.emit(doc)
    app.say(f"Created repository {settings.name} at {doc['location']} ({doc['encryption']}).")


# -- vms ----------------------------------------------------------------------------


@cli.command()
@json_option
@pass_app
def vms(app: App) -> None:
    """The VMs on this host, their state and their newest archive."""
    host = app.host()
    machines = sorted(host.vms(), key=lambda m: m.name)
    newest: dict[str, ArchiveInfo] = {}
    repository = None
    if app.config.repositories:
        repository = app.repository_config().name
        for archive in app.open_repository(read_only=True).archives():
            if archive.vm_uuid not in newest or archive.time >= newest[archive.vm_uuid].time:
                newest[archive.vm_uuid] = archive
    rows = []
    for machine in machines:
        latest = newest.get(machine.uuid)
        rows.append(
            {
                "name": machine.name,
                "uuid": machine.uuid,
                "state": machine.state.value,
                "newest_archive": None if latest is None else {"name": latest.name, "time": _time(latest)},
            }
        )
    app.emit(
        {
            "virtualbox": {"backend": app.config.virtualbox.backend, "test_double": app.simulated,
                           "version": host.version},
            "repository": repository,
            "vms": rows,
        }
    )
    title = f"VirtualBox {host.version}"
    if app.simulated:
        title += " (SIMULATED: a test double, not a real VirtualBox)"
    table = Table(title=title)
    for column in ("VM", "state", "newest archive", "time (UTC)"):
        table.add_column(column)
    for machine in machines:
        found = newest.get(machine.uuid)
        table.add_row(
            machine.name,
            machine.state.value,
            found.name if found else "-",
            f"{found.time:%Y-%m-%d %H:%M:%S}" if found else "-",
        )
    app.say(table)


# -- archives, info -----------------------------------------------------------------


@cli.command()
@click.argument("vm", required=False)
@json_option
@pass_app
def archives(app: App, vm: str | None) -> None:
    """The repository's archives, oldest first (of one VM, by name or uuid)."""
    found = app.open_repository(read_only=True).archives(vm=vm)
    app.emit({"repository": app.repository_config().name, "vm": vm, "archives": [_archive_doc(a) for a in found]})
    table = Table(title=f"archives of {vm}" if vm else "archives")
    for column in ("archive", "time (UTC)", "VM", "mode", "labels", "size"):
        table.add_column(column)
    for a in found:
        table.add_row(
            a.name, f"{a.time:%Y-%m-%d %H:%M:%S}", a.vm_name, a.mode.value, ", ".join(sorted(a.metadata.labels)),
            _size(sum(f.size for f in a.files)),
        )
    app.say(table)


@cli.command()
@click.argument("archive")
@json_option
@pass_app
def info(app: App, archive: str) -> None:
    """One archive: its VM, mode, labels, where it was taken, and its files."""
    found = app.open_repository(read_only=True).archive(archive)
    doc = _archive_doc(found, files=True)
    app.emit({"repository": app.repository_config().name, "archive": doc})
    app.say(f"archive   {found.name}\nid        {found.id}\ntime      {found.time:%Y-%m-%d %H:%M:%S} UTC")
    app.say(f"VM        {doc['vm_name']} ({doc['vm_uuid']})\nmode      {doc['mode']}")
    app.say(f"labels    {', '.join(doc['labels']) or '-'}\nhost      {doc['host'] or '-'}")
    app.say(f"VirtualBox {doc['vbox_version'] or '-'}")
    table = Table(title="files")
    for column in ("path", "role", "size", "chunking"):
        table.add_column(column)
    for f in doc["files"]:
        table.add_row(f["path"], f["role"], _size(f["size"]), f["chunking"])
    app.say(table)


# -- prune --------------------------------------------------------------------------


@cli.command()
@click.argument("vm_names", metavar="[VM]...", nargs=-1)
@click.option("--all", "all_vms", is_flag=True, help="Prune every VM that has archives in the repository.")
@click.option("--dry-run", "-n", is_flag=True, help="Show the plan; delete nothing.")
@json_option
@pass_app
def prune(app: App, vm_names: tuple[str, ...], all_vms: bool, dry_run: bool) -> None:
    """Delete the archives that the retention rules of the config do not keep, then compact.

    Each VM's rules are its [vms.NAME.keep] table, else the [keep] table;
    archives labelled with a keep_labels label stay. Guards keep the newest
    archive and refuse when a VM's newest archive is too old (exit code 6).
    """
    if all_vms and vm_names:
        raise click.UsageError("give VMs or --all, not both")
    repo = app.open_repository(read_only=dry_run)
    if all_vms or not vm_names:
        newest: dict[str, ArchiveInfo] = {}
        for archive in repo.archives():
            if archive.vm_uuid not in newest or archive.time >= newest[archive.vm_uuid].time:
                newest[archive.vm_uuid] = archive
        targets = sorted(((a.vm_name, uuid) for uuid, a in newest.items()), key=lambda t: t[0])
        if not all_vms:
            name = choose_vm(app, [n for n, _ in targets], purpose="prune")
            targets = [t for t in targets if t[0] == name]
    else:
        targets = [(name, name) for name in vm_names]
    for name, _ in targets:
        app.config.policy(name)  # every VM's rules are checked before anything is deleted
    results: list[tuple[str, PruneResult, str | None]] = []
    with _monitored(app, "prune", vms=[n for n, _ in targets], dry_run=dry_run, **_repo_detail(app)) as run:
        for name, selector in targets:
            pruner = Pruner(repo, app.config.policy(name))
            try:
                results.append((name, pruner.prune(selector, dry_run=dry_run), None))
            except PruneRefused as exc:
                # Nothing was deleted for this VM; the others go on, and the exit code says so.
                results.append((name, PruneResult(pruner.plan(selector), (), None, repo.append_only, True), str(exc)))
        doc = {
            "repository": app.repository_config().name,
            "dry_run": dry_run,
            "vms": [_prune_doc(name, result, refused) for name, result, refused in results],
        }
        run.result = doc
        app.emit(doc)
        for name, result, refused in results:
            _show_prune(app, name, result, refused, dry_run)
        refusals = [f"{name}: {refused}" for name, _, refused in results if refused]
        if refusals:
            raise CommandFailed("pruning refused for " + "; ".join(refusals), exit_code=6)


def _prune_doc(name: str, result: PruneResult, refused: str | None) -> dict[str, Any]:
    plan = result.plan
    return {
        "vm": name,
        "refused": refused or plan.refused,
        "entries": [
            {"archive": e.archive.name, "time": _time(e.archive), "keep": e.keep, "reason": e.reason}
            for e in plan.entries
        ],
        "deleted": list(result.deleted),
        "freed_bytes": result.freed_bytes,
    }


def _show_prune(app: App, name: str, result: PruneResult, refused: str | None, dry_run: bool) -> None:
    table = Table(title=f"{name}: {'plan (dry run)' if dry_run else 'pruned'}")
    for column in ("archive", "time (UTC)", "action", "reason"):
        table.add_column(column)
    for e in result.plan.entries:
        table.add_row(e.archive.name, f"{e.archive.time:%Y-%m-%d %H:%M:%S}", "keep" if e.keep else "prune", e.reason)
    app.say(table)
    if refused or result.plan.refused:
        app.say(f"refused: {refused or result.plan.refused}")
    elif not dry_run:
        app.say(f"deleted {len(result.deleted)} archives; compaction freed {_size(result.freed_bytes)}")


# -- check --------------------------------------------------------------------------


@cli.command()
@click.option("--verify-data", is_flag=True, help="Also read and verify every chunk (slow: reads all data).")
@json_option
@pass_app
def check(app: App, verify_data: bool) -> None:
    """Check the repository and its archives (borg check); exit code 1 when problems are found."""
    with _monitored(app, "check", verify_data=verify_data, **_repo_detail(app)) as run:
        result = app.open_repository().check(verify_data=verify_data)
        doc = {
            "repository": app.repository_config().name,
            "verify_data": verify_data,
            "ok": result.ok,
            "problems": list(result.problems),
        }
        run.result = doc
        app.emit(doc)
        if result.ok:
            app.say("No problems found." + (" Every chunk was read and verified." if verify_data else ""))
        else:
            for problem in result.problems:
                app.say(f"problem: {problem}")
            raise CommandFailed(f"the check found {len(result.problems)} problems")


# -- demo ---------------------------------------------------------------------------


@cli.command()
@click.option("--disk-mib", type=click.IntRange(8, 4096), default=256, show_default=True, help="The demo disk's size.")
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path), help="Work in this new folder and keep it.")
@pass_app
def demo(app: App, disk_mib: int, keep: Path | None) -> None:
    """The demo: no VirtualBox, no server; a VM-like folder into a repository in a temporary folder.

    It prints prose for people and has no --json document.
    """
    if app.json:
        raise click.UsageError("the demo prints prose for people; it has no --json output")
    from .. import demo as demo_module

    argv = ["--disk-mib", str(disk_mib)]
    if keep is not None:
        argv += ["--keep", str(keep)]
    demo_module.main(argv)

