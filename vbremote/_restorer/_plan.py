"""Planning a restore: what each block of each file needs, decided before any write.

For every file of a :class:`RestoreSource` the local file in the target folder
(if there is one) is hashed at the archive's own chunk boundaries with the
repository key's id hash (:meth:`Repository.local_ids`, parallel, in this
process). Each chunk of the archive is then one of:

- ``reuse``: the local data already has the chunk's id;
- ``done``: a journal of an interrupted restore of the same archive records the
  block as written and durable (trusted, not hashed again);
- ``zero``: the chunk is all zeros; it is never fetched (a hole is punched, or
  a region past the local end is simply left unwritten);
- ``copy``: the chunk's data is somewhere local (this file at another offset,
  another file of this restore, a seed file), read from there;
- ``fetch``: everything else; each distinct id is fetched once, however many
  offsets need it.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from attrs import field, frozen

from .._errors import ConfigurationError, RestoreError
from .._models import ChunkRef, Progress
from ._images import ImageDrive
from ._journal import RestoreState, intervals_cover
from ._source import RestoreSource, SourceFile

if TYPE_CHECKING:
    from .._repository import Repository

__all__ = ["BlockAction", "FilePlan", "PlanProblem", "RestorePlan", "make_plan", "plan_fingerprint"]

ActionKind = Literal["reuse", "done", "zero", "copy", "fetch"]


@frozen
class PlanProblem:
    """A finding that stops a restore until it is dealt with.

    Attributes:
        code: A short stable name, e.g. ``"vm-running"``, ``"no-space"``.
        message: What is wrong.
        remedy: What to do about it.
    """

    code: str
    message: str
    remedy: str


@frozen
class BlockAction:
    """What a restore does for one chunk of a file.

    Attributes:
        chunk: The archive's chunk (id, offset, size).
        kind: ``"reuse"``, ``"done"``, ``"zero"``, ``"copy"`` or ``"fetch"``.
        source: For ``"copy"``: the absolute path of the local file to read.
        source_offset: For ``"copy"``: where the data starts in ``source``.
    """

    chunk: ChunkRef
    kind: ActionKind
    source: str | None = None
    source_offset: int = 0


@frozen
class FilePlan:
    """The plan for one file.

    Attributes:
        source: The file as the archive has it.
        local_size: The size of the local file in the target folder, or None if there is none.
        blocks_reused: Chunks whose data is already in place.
        blocks_zero: All-zero chunks that are not in place (never fetched).
        blocks_copied: Chunks copied from local data.
        blocks_fetched: Chunks fetched from the repository (counted per offset).
        bytes_to_fetch: Bytes of the distinct chunks only this file fetches
            (a chunk several files need is counted once, at its first file).
        bytes_to_write: Bytes of data written (copies and fetches, at every offset).
        blocks_done: Chunks that an interrupted restore of the same archive
            already wrote, as its journal records.
    """

    source: SourceFile
    local_size: int | None
    blocks_reused: int
    blocks_zero: int
    blocks_copied: int
    blocks_fetched: int
    bytes_to_fetch: int
    bytes_to_write: int
    blocks_done: int = 0
    actions: tuple[BlockAction, ...] = field(default=(), repr=False)

    @property
    def bytes_zero(self) -> int:
        """Bytes of all-zero chunks that are not in place."""
        return sum(a.chunk.size for a in self.actions if a.kind == "zero")


@frozen
class RestorePlan:
    """What a restore will do, decided before any write.

    Attributes:
        source: What the archive restores.
        target: The target folder (absolute).
        files: One plan per data file.
        problems: Findings that stop the restore (empty when it may go ahead).
        fingerprint: A hash of the archive id and every file's chunk list; the
            journal is keyed by it.
        resumed: Whether a journal of an interrupted restore of this archive was found.
        ejected: The DVD and floppy drives the restore empties because their
            images are missing on this host (``eject_missing_images=True``).
    """

    source: RestoreSource
    target: Path
    files: tuple[FilePlan, ...]
    problems: tuple[PlanProblem, ...] = ()
    fingerprint: str = ""
    resumed: bool = False
    ejected: tuple[ImageDrive, ...] = ()

    @property
    def bytes_to_fetch(self) -> int:
        """Bytes fetched from the repository (each distinct chunk once)."""
        return sum(f.bytes_to_fetch for f in self.files)

    @property
    def bytes_to_write(self) -> int:
        """Bytes of data written into the target files."""
        return sum(f.bytes_to_write for f in self.files)

    @property
    def bytes_reused(self) -> int:
        """Bytes already in place (unchanged local data, or written by an interrupted run)."""
        return sum(a.chunk.size for f in self.files for a in f.actions if a.kind in ("reuse", "done"))

    @property
    def grows_by(self) -> int:
        """Bytes the target folder grows by at most: data written past each file's current end."""
        grows = 0
        for f in self.files:
            end = f.local_size or 0
            for a in f.actions:
                if a.kind in ("copy", "fetch") and a.chunk.offset + a.chunk.size > end:
                    grows += a.chunk.offset + a.chunk.size - max(end, a.chunk.offset)
        return grows

    def table(self) -> str:
        """The plan as a table for people: per file its size and what each block needs."""
        header = ("file", "size", "local", "reused", "zero", "copied", "fetched", "to fetch", "to write")
        rows = [header]
        for f in self.files:
            rows.append((
                f.source.target_path,
                _human(f.source.size),
                "-" if f.local_size is None else _human(f.local_size),
                str(f.blocks_reused + f.blocks_done),
                str(f.blocks_zero),
                str(f.blocks_copied),
                str(f.blocks_fetched),
                _human(f.bytes_to_fetch),
                _human(f.bytes_to_write),
            ))
        rows.append((
            "total", _human(sum(f.source.size for f in self.files)), "",
            str(sum(f.blocks_reused + f.blocks_done for f in self.files)),
            str(sum(f.blocks_zero for f in self.files)),
            str(sum(f.blocks_copied for f in self.files)),
            str(sum(f.blocks_fetched for f in self.files)),
            _human(self.bytes_to_fetch), _human(self.bytes_to_write),
        ))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
            for row in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.insert(len(lines) - 1, "  ".join("-" * w for w in widths))
        for problem in self.problems:
            lines.append(f"problem {problem.code}: {problem.message} ({problem.remedy})")
        return "\n".join(lines)


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def plan_fingerprint(source: RestoreSource) -> str:
    """A hash of the archive id and every file's target path, size and chunk list."""
    h = hashlib.sha256(source.archive_id.encode())
    for f in source.files:
        h.update(f"\0{f.target_path}\0{f.size}\0".encode())
        for c in f.chunks:
            h.update(c.id)
            h.update(c.size.to_bytes(8, "little"))
    return h.hexdigest()


def target_file(target: Path, relative: str) -> Path:
    """The absolute path of a target file, refusing a symlink on the way out of the folder.

    Raises:
        RestoreError: The path or one of its parent folders inside the target is a
            symlink, or the path exists and is not a regular file.
    """
    path = target
    for part in relative.split("/"):
        path = path / part
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return target / relative
        if stat.S_ISLNK(st.st_mode):
            raise RestoreError(f"{path} is a symlink; a restore never writes through one", path=relative)
    if not stat.S_ISREG(os.lstat(path).st_mode):
        raise RestoreError(f"{path} exists and is not a regular file", path=relative)
    return path


def make_plan(
    repository: Repository,
    source: RestoreSource,
    target: str | os.PathLike[str],
    *,
    seeds: Sequence[str | os.PathLike[str]] = (),
    progress: Callable[[Progress], None] | None = None,
    fetch_known: Callable[[list[ChunkRef]], None] | None = None,
) -> RestorePlan:
    """Decide what restoring ``source`` into ``target`` does, block by block; writes nothing.

    Local files are hashed at the archive's own chunk boundaries. A chunk whose
    data is found locally is copied rather than fetched; the places searched
    are every local file of this restore and the ``seeds``, each hashed at the
    offsets of every chunk boundary of the archive's files (so data that sits
    at the same place in another file, or on the same block grid as the
    archive's fixed chunking, is found; data at an unrelated offset is not).
    A journal of an interrupted restore of the same archive in ``target`` is
    trusted: the blocks it records are not hashed again.

    Args:
        repository: The repository the archive is in (its key's id hash is used).
        source: What the archive restores.
        target: The target folder (need not exist).
        seeds: Further local files that may hold needed data (an older copy,
            a sibling VM's disk); only read.
        progress: Called with a :class:`Progress` (operation ``"hash"``) while hashing.
        fetch_known: Called, while hashing goes on, with chunks the plan will
            fetch, as soon as that is certain (at most once per stage of sizes
            but the last; a chunk may be listed more than once, once per offset):
            a caller may start fetching them meanwhile. The plan is the same with
            or without it.

    Returns:
        The plan.

    Raises:
        RestoreError: A target path is a symlink or not a regular file.
        ConfigurationError: A seed cannot be read.
    """
    target_dir = Path(os.path.abspath(target))
    fingerprint = plan_fingerprint(source)
    state = RestoreState.load(target_dir)
    resumed = state is not None and state.archive_id == source.archive_id and state.fingerprint == fingerprint
    done_by_path = {f.path: f.done for f in state.files} if state is not None and resumed else {}

    paths: dict[str, Path] = {}
    local_sizes: dict[str, int | None] = {}
    for f in source.files:
        path = target_file(target_dir, f.target_path)
        paths[f.target_path] = path
        try:
            size: int | None = os.stat(path).st_size
        except FileNotFoundError:
            size = None
        local_sizes[f.target_path] = size
        done = done_by_path.get(f.target_path, ())
        if done and (size is None or done[-1][1] > size):
            # The file is not what the journal saw (removed or cut since): trust none of it.
            done_by_path[f.target_path] = ()

    # The zero ids of all sizes, smallest first: each goes on from the one before (see IdHasher.zero_id).
    zero_ids = {
        size: repository.zero_chunk_id(size) for size in sorted({c.size for f in source.files for c in f.chunks})
    }
    local_ids: dict[str, list[bytes | None]] = {f.target_path: [None] * len(f.chunks) for f in source.files}
    kinds: dict[str, list[ActionKind | None]] = {f.target_path: [None] * len(f.chunks) for f in source.files}
    # An index of local data: id -> (path, offset), from what was hashed and from the seeds.
    index: dict[bytes, tuple[str, int]] = {}
    candidates: list[Path] = [paths[f.target_path] for f in source.files if local_sizes[f.target_path] is not None]
    candidates += [Path(os.path.abspath(seed)) for seed in seeds]
    own_ranges = {os.fspath(paths[f.target_path]): {(c.offset, c.size) for c in f.chunks} for f in source.files}

    # Data can only have a chunk's id where a range of the chunk's size is hashed, so chunks of
    # different sizes are decided independently: the sizes are taken in stages, the one that costs
    # the most hashing last. Whatever the stages, the plan is the same; the chunks an earlier stage
    # finds nowhere locally are final fetches, handed to ``fetch_known`` while the rest is hashed.
    stages = _size_stages(source, local_sizes, done_by_path)
    for number, stage in enumerate(stages):
        # 1. Local ids of each existing target file at the archive's boundaries.
        for f in source.files:
            done = done_by_path.get(f.target_path, ())
            if local_sizes[f.target_path] is None:
                continue
            wanted = [
                k for k, c in enumerate(f.chunks) if c.size in stage and not intervals_cover(done, c.offset, c.size)
            ]
            if not wanted:
                continue
            ids = repository.local_ids(paths[f.target_path], [f.chunks[k] for k in wanted], progress=progress)
            row_ids = local_ids[f.target_path]
            for k, chunk_id in zip(wanted, ids, strict=True):
                row_ids[k] = chunk_id

        # 2. Decide reuse / done / zero; collect what is still needed.
        needed: set[bytes] = set()
        for f in source.files:
            done = done_by_path.get(f.target_path, ())
            row = kinds[f.target_path]
            for k, (c, local) in enumerate(zip(f.chunks, local_ids[f.target_path], strict=True)):
                if c.size not in stage:
                    continue
                if intervals_cover(done, c.offset, c.size):
                    row[k] = "done"
                elif local == c.id:
                    row[k] = "reuse"
                elif c.id == zero_ids[c.size]:
                    row[k] = "zero"
                else:
                    needed.add(c.id)
        if not needed:
            continue

        # 3. Where else the needed chunks are: the hashed ranges, then every file at every boundary.
        for f in source.files:
            for c, local in zip(f.chunks, local_ids[f.target_path], strict=True):
                if c.size in stage and local is not None and local in needed:
                    index.setdefault(local, (os.fspath(paths[f.target_path]), c.offset))
        # Only ranges of a size some needed chunk has can hold it.
        sizes = {c.size for f in source.files for c in f.chunks if c.id in needed}
        grid = sorted({(c.offset, c.size) for f in source.files for c in f.chunks if c.size in sizes})
        for candidate in candidates:
            if not needed - index.keys():
                break
            try:
                csize = os.stat(candidate).st_size
            except OSError as exc:
                raise ConfigurationError(f"cannot read seed {candidate}: {exc.strerror}") from exc
            # Parts of a target file that were not hashed at the boundaries of its own archive file.
            skip = own_ranges.get(os.fspath(candidate), set())
            ranges = [(o, n) for o, n in grid if o + n <= csize and (o, n) not in skip]
            if not ranges:
                continue
            found_ids = repository.local_ids(candidate, ranges, progress=progress)
            for (offset, _size), chunk_id in zip(ranges, found_ids, strict=True):
                if chunk_id is not None and chunk_id in needed:
                    index.setdefault(chunk_id, (os.fspath(candidate), offset))
        if fetch_known is not None and number < len(stages) - 1:
            known = [
                c for f in source.files for c, kind in zip(f.chunks, kinds[f.target_path], strict=True)
                if kind is None and c.size in stage and c.id not in index
            ]
            if known:
                fetch_known(known)

    # 4. The file plans.
    fetched: set[bytes] = set()
    plans: list[FilePlan] = []
    for f in source.files:
        actions: list[BlockAction] = []
        counts = {"reuse": 0, "done": 0, "zero": 0, "copy": 0, "fetch": 0}
        to_fetch = to_write = 0
        local_size = local_sizes[f.target_path]
        for c, kind in zip(f.chunks, kinds[f.target_path], strict=True):
            if kind is None:
                found = index.get(c.id)
                if found is not None:
                    actions.append(BlockAction(c, "copy", found[0], found[1]))
                    kind = "copy"
                else:
                    actions.append(BlockAction(c, "fetch"))
                    kind = "fetch"
                    if c.id not in fetched:
                        fetched.add(c.id)
                        to_fetch += c.size
                to_write += c.size
            else:
                actions.append(BlockAction(c, kind))
            counts[kind] += 1
        plans.append(FilePlan(
            source=f, local_size=local_size, blocks_reused=counts["reuse"], blocks_zero=counts["zero"],
            blocks_copied=counts["copy"], blocks_fetched=counts["fetch"], bytes_to_fetch=to_fetch,
            bytes_to_write=to_write, blocks_done=counts["done"], actions=tuple(actions),
        ))

    plan = RestorePlan(
        source=source, target=target_dir, files=tuple(plans), fingerprint=fingerprint, resumed=resumed
    )
    problems = _space_problems(plan)
    if problems:
        plan = RestorePlan(
            source=source, target=target_dir, files=plan.files, problems=problems,
            fingerprint=fingerprint, resumed=resumed,
        )
    return plan


def _size_stages(
    source: RestoreSource, local_sizes: dict[str, int | None], done_by_path: dict[str, tuple[tuple[int, int], ...]]
) -> list[set[int]]:
    """The chunk sizes in the order the plan hashes them: all but the costliest, then the costliest.

    The cost of a size is the bytes hashed at the boundaries of chunks of that
    size in the existing local files (most often the disks' block size).
    """
    cost: dict[int, int] = {}
    for f in source.files:
        done = done_by_path.get(f.target_path, ())
        for c in f.chunks:
            hashed = local_sizes[f.target_path] is not None and not intervals_cover(done, c.offset, c.size)
            cost[c.size] = cost.get(c.size, 0) + (c.size if hashed else 0)
    if len(cost) < 2:
        return [set(cost)]
    costliest = max(cost, key=lambda size: (cost[size], size))
    return [set(cost) - {costliest}, {costliest}]


def _holes(path: Path) -> list[tuple[int, int]]:
    """The holes of a sparse file as ``(start, end)`` ranges (none where the file system does not say)."""
    holes: list[tuple[int, int]] = []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return holes
    try:
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            hole = os.lseek(fd, offset, os.SEEK_HOLE)
            if hole >= size:
                break
            try:
                data = os.lseek(fd, hole, os.SEEK_DATA)
            except OSError:  # ENXIO: a hole up to the end
                data = size
            holes.append((hole, data))
            offset = data
    except OSError:
        return []
    finally:
        os.close(fd)
    return holes


def _filled_holes(plan: RestorePlan) -> int:
    """Bytes the restore writes into holes of the existing files (they take space as data past the end does)."""
    filled = 0
    for f in plan.files:
        if not f.local_size:
            continue
        holes = _holes(target_file(plan.target, f.source.target_path))
        if not holes:
            continue
        for a in f.actions:
            if a.kind not in ("copy", "fetch") or a.chunk.offset >= f.local_size:
                continue
            start, end = a.chunk.offset, min(a.chunk.offset + a.chunk.size, f.local_size)
            at = bisect.bisect_right(holes, (start, end)) - 1
            for hole_start, hole_end in holes[max(at, 0):]:
                if hole_start >= end:
                    break
                filled += max(0, min(end, hole_end) - max(start, hole_start))
    return filled


def _space_problems(plan: RestorePlan) -> tuple[PlanProblem, ...]:
    folder = plan.target
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    grows = plan.grows_by + _filled_holes(plan)
    if grows > free:
        return (PlanProblem(
            "no-space",
            f"the restore writes up to {grows} bytes more than the files in {plan.target} hold now, "
            f"and only {free} bytes are free there",
            "free space on that file system, or restore into another folder",
        ),)
    return ()


def distinct_fetches(plan: RestorePlan) -> Iterable[bytes]:
    """The ids the plan fetches, each once, in file and offset order."""
    seen: set[bytes] = set()
    for f in plan.files:
        for a in f.actions:
            if a.kind == "fetch" and a.chunk.id not in seen:
                seen.add(a.chunk.id)
                yield a.chunk.id

