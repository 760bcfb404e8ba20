"""Pruner, retention policies and guards, on real repositories; built-ins checked against borg prune."""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import PASSPHRASE, BorgCLI, metadata
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vbremote

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def tiny(tmp_path: Path) -> list[vbremote.FileSpec]:
    path = tmp_path / "vm.vbox"
    if not path.exists():
        path.write_text("<VirtualBox/>\n")
    return [vbremote.FileSpec(path, "vm.vbox", vbremote.FileRole.SETTINGS)]


def add(repo: vbremote.Repository, tmp_path: Path, name: str, when: datetime,
        meta: vbremote.SnapshotMetadata) -> None:
    repo.write_archive(name, tiny(tmp_path), meta, timestamp=when)


class TestKeepRules:
    def test_needs_a_rule(self):
        """A KeepRules without any rule is refused."""
        with pytest.raises(vbremote.ConfigurationError):
            vbremote.KeepRules()

    def test_bad_values(self):
        """Negative counts, a non-positive within, and last with secondly are refused."""
        with pytest.raises(vbremote.ConfigurationError):
            vbremote.KeepRules(daily=-1)
        with pytest.raises(vbremote.ConfigurationError):
            vbremote.KeepRules(within=timedelta(0))
        with pytest.raises(vbremote.ConfigurationError):
            vbremote.KeepRules(last=1, secondly=1)

    def test_union(self, repo, tmp_path):
        """a | b keeps what either keeps, with the first keeping policy's reason."""
        meta = metadata("dev", labels={"release"})
        add(repo, tmp_path, "old", NOW - timedelta(days=400), meta)
        add(repo, tmp_path, "new", NOW - timedelta(hours=1), metadata("dev", meta.vm_uuid))
        policy = vbremote.KeepRules(last=1) | vbremote.KeepLabels({"release"})
        plan = vbremote.Pruner(repo, policy, clock=lambda: NOW).plan("dev")
        assert [(e.archive.name, e.keep, e.reason) for e in plan.entries] == [
            ("new", True, "last #1"),
            ("old", True, "label release"),
        ]


class OnlyMigrations(vbremote.RetentionPolicy):
    """A custom policy: keep every 'migrate' snapshot, and the newest of the rest."""

    def decide(self, archives: Sequence[vbremote.ArchiveInfo], now: datetime) -> list[vbremote.Decision]:
        out = []
        for i, archive in enumerate(archives):
            if archive.mode is vbremote.SnapshotMode.MIGRATE:
                out.append(vbremote.Decision(True, "migration"))
            else:
                out.append(vbremote.Decision(i == 0, "newest" if i == 0 else "not a migration"))
        return out


class TestPruner:
    def test_selection_by_uuid(self, repo, tmp_path):
        """Pruning 'dev' never touches 'dev2', and a renamed VM keeps its history."""
        dev, dev2 = metadata("dev"), metadata("dev2")
        for day in range(5):
            add(repo, tmp_path, f"dev-{day}", NOW - timedelta(days=day), dev)
            add(repo, tmp_path, f"dev2-{day}", NOW - timedelta(days=day), dev2)
        add(repo, tmp_path, "renamed", NOW + timedelta(hours=1), metadata("dev-renamed", dev.vm_uuid))
        result = vbremote.Pruner(repo, vbremote.KeepRules(last=2), clock=lambda: NOW).prune("dev-renamed")
        assert sorted(result.deleted) == ["dev-1", "dev-2", "dev-3", "dev-4"]
        assert [a.name for a in repo.archives(vm="dev2")] == [f"dev2-{d}" for d in reversed(range(5))]

    def test_dry_run_changes_nothing(self, repo, tmp_path):
        """A dry run returns the plan and deletes nothing."""
        meta = metadata("dev")
        for day in range(4):
            add(repo, tmp_path, f"a{day}", NOW - timedelta(days=day), meta)
        result = vbremote.Pruner(repo, vbremote.KeepRules(last=1), clock=lambda: NOW).prune("dev", dry_run=True)
        assert result.dry_run
        assert result.deleted == ()
        assert len(result.plan.prune) == 3
        assert len(repo.archives()) == 4

    def test_prune_frees_space(self, repo, tmp_path):
        """Pruning deletes, compacts and reports the space freed."""
        meta = metadata("dev")
        for day in range(3):
            disk = tmp_path / f"d{day}.img"
            disk.write_bytes(os.urandom(1 << 20))
            repo.write_archive(f"a{day}", [vbremote.FileSpec(disk, "d.img", vbremote.FileRole.DISK)], meta,
                               timestamp=NOW - timedelta(days=day))
        result = vbremote.Pruner(repo, vbremote.KeepRules(last=1), clock=lambda: NOW).prune("dev")
        assert sorted(result.deleted) == ["a1", "a2"]
        assert result.freed_bytes is not None
        assert result.freed_bytes >= 2 << 20
        assert repo.check().ok

    def test_protected_and_labels_set_later(self, repo, tmp_path):
        """An archive labelled 'protected' (here after it was taken) is never pruned."""
        meta = metadata("dev")
        for day in range(3):
            add(repo, tmp_path, f"a{day}", NOW - timedelta(days=day), meta)
        info = repo.set_labels("a2", {vbremote.PROTECTED_LABEL})
        assert info.metadata.labels == {"protected"}
        assert repo.archive("a2").metadata.labels == {"protected"}
        plan = vbremote.Pruner(repo, vbremote.KeepRules(last=1), clock=lambda: NOW).plan("dev")
        assert [(e.archive.name, e.keep, e.reason) for e in plan.entries] == [
            ("a0", True, "last #1"),
            ("a1", False, "no rule"),
            ("a2", True, "protected"),
        ]

    def test_guard_newest(self, repo, tmp_path):
        """The newest archive is kept even when the policy prunes it."""
        meta = metadata("dev")
        add(repo, tmp_path, "a", NOW - timedelta(days=1), meta)
        add(repo, tmp_path, "b", NOW, meta)
        plan = vbremote.Pruner(repo, vbremote.KeepLabels({"x"}), clock=lambda: NOW).plan("dev")
        assert [(e.archive.name, e.keep, e.reason) for e in plan.entries] == [
            ("b", True, "guard: newest"),
            ("a", False, "no rule"),
        ]

    def test_guard_min_keep(self, repo, tmp_path):
        """min_keep keeps the newest archives the policy would prune, up to the minimum."""
        meta = metadata("dev")
        for day in range(5):
            add(repo, tmp_path, f"a{day}", NOW - timedelta(days=day), meta)
        pruner = vbremote.Pruner(repo, vbremote.KeepRules(last=1), guards=vbremote.Guards(min_keep=3),
                                 clock=lambda: NOW)
        plan = pruner.plan("dev")
        assert [e.keep for e in plan.entries] == [True, True, True, False, False]
        assert plan.entries[1].reason == "guard: min_keep 3"

    def test_guard_max_age(self, repo, tmp_path):
        """When the newest archive is older than max_age, prune refuses and deletes nothing."""
        meta = metadata("dev")
        for day in range(40, 45):
            add(repo, tmp_path, f"a{day}", NOW - timedelta(days=day), meta)
        pruner = vbremote.Pruner(repo, vbremote.KeepRules(last=1), clock=lambda: NOW)
        assert pruner.plan("dev").refused
        with pytest.raises(vbremote.PruneRefused, match="stopped"):
            pruner.prune("dev")
        assert len(repo.archives()) == 5
        off = vbremote.Pruner(repo, vbremote.KeepRules(last=1), guards=vbremote.Guards(max_age=None),
                              clock=lambda: NOW)
        assert len(off.prune("dev").deleted) == 4

    def test_custom_policy(self, repo, tmp_path):
        """A user's policy decides, and a wrong number of decisions is an error."""
        meta = metadata("dev")
        migrated = metadata("dev", meta.vm_uuid, mode=vbremote.SnapshotMode.MIGRATE)
        add(repo, tmp_path, "m", NOW - timedelta(days=3), migrated)
        add(repo, tmp_path, "o1", NOW - timedelta(days=2), meta)
        add(repo, tmp_path, "o2", NOW - timedelta(days=1), meta)
        plan = vbremote.Pruner(repo, OnlyMigrations(), clock=lambda: NOW).plan("dev")
        assert [(e.archive.name, e.keep) for e in plan.entries] == [("o2", True), ("o1", False), ("m", True)]

        class Broken(vbremote.RetentionPolicy):
            def decide(self, archives, now):
                return []

        with pytest.raises(vbremote.ConfigurationError, match="decisions"):
            vbremote.Pruner(repo, Broken(), clock=lambda: NOW).plan("dev")

    def test_append_only_refused(self, tmp_path, base_dir, borg_cli):
        """Pruning an append-only repository is refused: deletes there would free nothing."""
        transport = vbremote.LocalTransport(tmp_path / "ao")
        borg_cli("init", "--encryption=repokey", "--append-only", transport.path)
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir) as repo:
            meta = metadata("dev")
            add(repo, tmp_path, "a", NOW - timedelta(days=1), meta)
            add(repo, tmp_path, "b", NOW, meta)
            with pytest.raises(vbremote.PruneRefused, match="append-only"):
                vbremote.Pruner(repo, vbremote.KeepRules(last=1), clock=lambda: NOW).prune("dev")
            assert len(repo.archives()) == 2

    def test_plan_all(self, repo, tmp_path):
        """plan_all plans every VM from one listing, keyed by uuid, with the same decisions as plan."""
        dev, dev2 = metadata("dev"), metadata("dev2")
        for day in range(3):
            add(repo, tmp_path, f"dev-{day}", NOW - timedelta(days=day), dev)
            add(repo, tmp_path, f"dev2-{day}", NOW - timedelta(days=day), dev2)
        pruner = vbremote.Pruner(repo, vbremote.KeepRules(last=2), clock=lambda: NOW)
        plans = pruner.plan_all()
        assert set(plans) == {dev.vm_uuid, dev2.vm_uuid}
        assert plans[dev.vm_uuid].entries == pruner.plan("dev").entries
        assert [a.name for a in plans[dev2.vm_uuid].prune] == ["dev2-2"]

    def test_table(self, repo, tmp_path):
        """The plan renders as a table with one line per archive."""
        meta = metadata("dev")
        add(repo, tmp_path, "a", NOW, meta)
        table = vbremote.Pruner(repo, vbremote.KeepRules(daily=1), clock=lambda: NOW).plan("dev").table()
        assert "a" in table
        assert "daily #1" in table


# --- equivalence with borg prune --------------------------------------------------

# Time zones as POSIX TZ strings, so both borg (libc) and this process read them
# without tz database files: UTC, central Europe and US Eastern, both with DST.
ZONES = ["UTC0", "CET-1CEST,M3.5.0,M10.5.0/3", "EST5EDT,M3.2.0,M11.1.0"]

# Moments next to period boundaries: midnights, ISO week and year turns (2020
# has an ISO week 53), quarter turns, and the DST changes of 2024 in both zones.
ANCHORS = [
    datetime(2020, 12, 31, 23, 0, tzinfo=UTC), datetime(2021, 1, 4, 0, 0, tzinfo=UTC),
    datetime(2023, 12, 31, 22, 30, tzinfo=UTC), datetime(2024, 1, 1, 0, 0, tzinfo=UTC),
    datetime(2024, 3, 10, 7, 0, tzinfo=UTC), datetime(2024, 3, 31, 1, 0, tzinfo=UTC),
    datetime(2024, 3, 31, 23, 0, tzinfo=UTC), datetime(2024, 6, 30, 22, 0, tzinfo=UTC),
    datetime(2024, 9, 29, 23, 30, tzinfo=UTC), datetime(2024, 10, 27, 1, 0, tzinfo=UTC),
    datetime(2024, 11, 3, 6, 0, tzinfo=UTC), datetime(2024, 12, 29, 23, 0, tzinfo=UTC),
]


def _timestamps(seed: int, count: int, recent_base: datetime) -> list[datetime]:
    rng = random.Random(seed)
    stamps = set()
    while len(stamps) < count:
        kind = rng.random()
        if kind < 0.6:
            stamp = rng.choice(ANCHORS) + timedelta(seconds=rng.randint(-3 * 3600, 3 * 3600))
        elif kind < 0.8:
            stamp = rng.choice(ANCHORS) + timedelta(days=rng.randint(-20, 20), seconds=rng.randint(0, 86399))
        else:
            # Recent archives sit half-way between whole hours, so that whole-hour
            # keep-within cut-offs never fall within minutes of one.
            stamp = recent_base - timedelta(hours=rng.randint(0, 200), minutes=30)
        stamps.add(stamp.replace(microsecond=0))
    return sorted(stamps)


class PruneRepos:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.base = root / "base"
        self.base.mkdir()
        self.cli = BorgCLI(self.base)
        self.created = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        self.repos: list[tuple[vbremote.LocalTransport, list[vbremote.ArchiveInfo]]] = []
        for seed in (1, 2):
            transport = vbremote.LocalTransport(root / f"repo{seed}")
            meta = metadata(f"vm{seed}")
            with vbremote.Repository.init(transport, passphrase=PASSPHRASE, base_dir=self.base) as repo:
                for n, stamp in enumerate(_timestamps(seed, 45, self.created)):
                    repo.write_archive(f"vm{seed}-{n:03d}", tiny(root), meta, timestamp=stamp)
                archives = sorted(repo.archives(vm=meta.vm_uuid), key=lambda a: a.time, reverse=True)
            self.repos.append((transport, archives))


@pytest.fixture(scope="module")
def prune_repos(tmp_path_factory: pytest.TempPathFactory) -> PruneRepos:
    return PruneRepos(tmp_path_factory.mktemp("prune"))


@pytest.fixture
def zone() -> Iterator[None]:
    saved = os.environ.get("TZ")
    yield
    if saved is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = saved
    time.tzset()


RULES = ["secondly", "minutely", "hourly", "daily", "weekly", "monthly",
         "quarterly_13weekly", "quarterly_3monthly", "yearly"]
BORG_OPTION = {"quarterly_13weekly": "--keep-13weekly", "quarterly_3monthly": "--keep-3monthly"}
LINE = re.compile(r"^(?:Keeping archive \(rule: (?P<rule>[^)]*)\)|Would prune):\s+(?P<name>\S+)")

rule_sets = st.dictionaries(st.sampled_from(RULES), st.integers(0, 8), min_size=1, max_size=4)


@pytest.mark.borgcli
@pytest.mark.slow
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rules=rule_sets, within_hours=st.none() | st.integers(1, 240), zone_name=st.sampled_from(ZONES),
       which=st.integers(0, 1))
def test_same_as_borg_prune(prune_repos, zone, rules, within_hours, zone_name, which):
    """vbremote's KeepRules keeps exactly what 'borg prune --dry-run --list' keeps, for the same rules."""
    transport, archives = prune_repos.repos[which]
    options = []
    for rule, count in sorted(rules.items()):
        options += [BORG_OPTION.get(rule, f"--keep-{rule}"), str(count)]
    if within_hours is not None:
        options += ["--keep-within", f"{within_hours}H"]
    result = BorgCLI(prune_repos.base, extra_env={"TZ": zone_name}).run(
        "prune", "--dry-run", "--list", *options, transport.path
    )
    kwargs = {"within": None if within_hours is None else timedelta(hours=within_hours), **rules}
    both_quarterly = bool(rules.get("quarterly_13weekly") and rules.get("quarterly_3monthly"))
    if both_quarterly or (not any(rules.values()) and within_hours is None):
        # borg refuses both quarterly rules at once, and a rule set whose
        # counts are all 0; so does KeepRules.
        assert result.returncode != 0
        with pytest.raises(vbremote.ConfigurationError):
            vbremote.KeepRules(**kwargs)
        return
    assert result.returncode == 0, result.stderr
    borg_kept = {}
    for line in result.stderr.splitlines():
        match = LINE.match(line)
        if match and match["rule"]:
            borg_kept[match["name"]] = match["rule"]

    os.environ["TZ"] = zone_name
    time.tzset()
    decisions = vbremote.KeepRules(**kwargs).decide(archives, datetime.now(UTC))
    ours = {
        a.name: re.sub(r"^within .* #", "within #", d.reason) for a, d in zip(archives, decisions, strict=True)
        if d.keep
    }
    assert ours == borg_kept
