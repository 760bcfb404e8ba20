"""SSH transport against a real sshd on loopback, started and stopped by the fixture."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from helpers import PASSPHRASE, BorgCLI, borg_executable, disk_content, metadata

import vbremote
from vbremote.testing import check_transport

pytestmark = pytest.mark.ssh


@attrs.frozen
class SSHServer:
    port: int
    user: str
    client_key: Path
    forced_key: Path
    known_hosts: Path
    forced_root: Path
    log: Path

    def options(self) -> tuple[str, ...]:
        return (f"UserKnownHostsFile={self.known_hosts}", "StrictHostKeyChecking=yes")

    def transport(self, path: Path | str, *, key: Path | None = None, **kwargs: object) -> vbremote.SSHTransport:
        return vbremote.SSHTransport(
            "127.0.0.1",
            str(path),
            user=self.user,
            port=self.port,
            identity_file=key or self.client_key,
            ssh_options=self.options(),
            remote_borg=borg_executable(),
            **kwargs,  # type: ignore[arg-type]
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip() if path.suffix else Path(f"{path}.pub").read_text().strip()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    """A real sshd on 127.0.0.1 with a plain key and a key forced to borg serve --append-only."""
    sshd_bin = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
    if sshd_bin is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("sshd/ssh/ssh-keygen are not installed (Debian packages openssh-server, openssh-client)")
    root = tmp_path_factory.mktemp("sshd")
    host_key = root / "host_key"
    _keygen(host_key)
    client_key = root / "client_key"
    client_pub = _keygen(client_key)
    forced_key = root / "forced_key"
    forced_pub = _keygen(forced_key)
    forced_root = root / "forced-area"
    forced_root.mkdir()
    borg = borg_executable()
    forced_command = f"{borg} serve --append-only --restrict-to-path {forced_root}"
    (root / "authorized_keys").write_text(
        f"{client_pub}\ncommand=\"{forced_command}\",restrict {forced_pub}\n"
    )
    port = _free_port()
    user = getpass.getuser()
    config = root / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {host_key}",
                f"PidFile {root / 'sshd.pid'}",
                f"AuthorizedKeysFile {root / 'authorized_keys'}",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "StrictModes no",
                "UsePAM no",
                f"AllowUsers {user}",
                "LogLevel VERBOSE",
                "",
            ]
        )
    )
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    log = root / "sshd.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen([sshd_bin, "-D", "-e", "-f", str(config)], stderr=log_file)
    host_pub = Path(f"{host_key}.pub").read_text().split()
    known_hosts = root / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"sshd did not start: {log.read_text()}")
            time.sleep(0.05)
    try:
        yield SSHServer(port, user, client_key, forced_key, known_hosts, forced_root, log)
    finally:
        process.terminate()
        process.wait(timeout=10)


class TestSSHTransport:
    def test_conformance(self, sshd, tmp_path):
        """check_transport passes over SSH to borg serve."""
        check_transport(sshd.transport(tmp_path / "repo"))

    def test_roundtrip_and_local_ids(self, sshd, tmp_path, base_dir):
        """Write, list, chunk list and fetch over SSH; the local ids match the remote chunks."""
        transport = sshd.transport(tmp_path / "repo")
        image = tmp_path / "disk.img"
        content = disk_content(40, seed=9)
        image.write_bytes(content)
        spec = vbremote.FileSpec(image, "disk.img", vbremote.FileRole.DISK)
        with vbremote.Repository.init(transport, passphrase=PASSPHRASE, base_dir=base_dir) as repo:
            repo.write_archive("a", [spec], metadata())
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir) as repo:
            chunks = repo.chunk_list("a", "disk.img")
            assert repo.local_chunk_ids(image) == [c.id for c in chunks.chunks]
            assert b"".join(d for _, d in repo.fetch_chunks(c.id for c in chunks.chunks)) == content
            assert repo.append_only is None  # borg's protocol cannot tell

    def test_ssh_config_alias_with_port(self, sshd, tmp_path, base_dir):
        """A host alias whose ssh_config entry names the port works: no -p overrides the Port line."""
        config = tmp_path / "ssh_config"
        config.write_text(
            "Host vbremote-store\n"
            "    HostName 127.0.0.1\n"
            f"    Port {sshd.port}\n"
            f"    User {sshd.user}\n"
            f"    IdentityFile {sshd.client_key}\n"
            "    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {sshd.known_hosts}\n"
            "    StrictHostKeyChecking yes\n"
        )
        # ssh reads ~/.ssh/config of the passwd home, not $HOME: a wrapper hands it this file.
        wrapper = tmp_path / "ssh-with-config"
        wrapper.write_text(f'#!/bin/sh\nexec ssh -F "{config}" "$@"\n')
        wrapper.chmod(0o755)
        transport = vbremote.SSHTransport(
            "vbremote-store", str(tmp_path / "repo"), ssh_command=str(wrapper), remote_borg=borg_executable()
        )
        assert "-p" not in transport.serve_command()
        with vbremote.Repository.init(transport, passphrase=PASSPHRASE, base_dir=base_dir) as repo:
            repo.write_archive("a", [vbremote.FileSpec(config, "cfg")], metadata())
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir) as repo:
            assert [a.name for a in repo.archives()] == ["a"]

    def test_bad_host_key_is_refused_without_prompt(self, sshd, tmp_path, base_dir):
        """An unknown host key fails at once with ssh's own words; nothing waits on a terminal."""
        empty = tmp_path / "known_hosts"
        empty.write_text("")
        transport = attrs.evolve(
            sshd.transport(tmp_path / "repo"),
            ssh_options=(f"UserKnownHostsFile={empty}", "StrictHostKeyChecking=yes"),
        )
        with pytest.raises(vbremote.ConnectionFailed, match=r"(?i)host key"):
            vbremote.Repository.init(transport, passphrase=PASSPHRASE, base_dir=base_dir)

    def test_connection_refused(self, tmp_path, base_dir):
        """Nothing listening: ConnectionFailed carrying ssh's message."""
        transport = vbremote.SSHTransport(
            "127.0.0.1", str(tmp_path / "r"), port=_free_port(), ssh_options=("ConnectTimeout=5",)
        )
        with pytest.raises(vbremote.ConnectionFailed, match=r"(?i)refused"):
            vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir)

    def test_missing_remote_repository(self, sshd, tmp_path, base_dir):
        """A path with no repository on the server raises RepositoryNotFound."""
        with pytest.raises(vbremote.RepositoryNotFound):
            vbremote.Repository.open(sshd.transport(tmp_path / "none"), passphrase=PASSPHRASE, base_dir=base_dir)

    def test_lock_between_two_clients(self, sshd, tmp_path, base_dir):
        """A second client over SSH waits for the first one's lock, then raises RepositoryLocked."""
        transport = sshd.transport(tmp_path / "repo")
        with (
            vbremote.Repository.init(transport, passphrase=PASSPHRASE, base_dir=base_dir),
            pytest.raises(vbremote.RepositoryLocked),
        ):
            vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir, lock_wait=0.5)


class TestAppendOnlyKey:
    """A key forced to 'borg serve --append-only --restrict-to-path AREA' in authorized_keys."""

    def _prepare(self, sshd: SSHServer, tmp_path: Path, base_dir: Path) -> tuple[Path, vbremote.SSHTransport]:
        repo_path = sshd.forced_root / tmp_path.name
        # The repository is made on the server side (as its admin would); the key only appends.
        admin = tmp_path / "admin-base"
        admin.mkdir()
        vbremote.Repository.init(vbremote.LocalTransport(repo_path), passphrase=PASSPHRASE, base_dir=admin).close()
        return repo_path, sshd.transport(repo_path, key=sshd.forced_key, append_only=True)

    def test_writes_work_and_delete_keeps_data(self, sshd, tmp_path, base_dir):
        """Writes work; a delete through the key is reported append-only and the server can roll it back."""
        repo_path, transport = self._prepare(sshd, tmp_path, base_dir)
        image = tmp_path / "disk.img"
        image.write_bytes(disk_content(6, seed=4))
        spec = vbremote.FileSpec(image, "disk.img", vbremote.FileRole.DISK)
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir) as repo:
            repo.write_archive("keep-me", [spec], metadata())
            transactions_before = (repo_path / "transactions").read_text().splitlines()
            deleted = repo.delete_archives(["keep-me"])
            assert deleted.append_only is True
            compacted = repo.compact()
            assert (compacted.append_only, compacted.freed_bytes) == (True, None)
            assert repo.archives() == []

        # Server side: roll back to the transaction before the delete, as borg documents.
        last_good = int(transactions_before[-1].split()[1].rstrip(","))
        for segment in (repo_path / "data").rglob("*"):
            if segment.is_file() and segment.name.isdigit() and int(segment.name) > last_good:
                segment.unlink()
        for pattern in ("index.*", "hints.*", "integrity.*"):
            for stale in repo_path.glob(pattern):
                stale.unlink()
        server = BorgCLI(tmp_path / "server-base")
        server.base_dir.mkdir()
        assert "keep-me" in server("list", str(repo_path))
        server("check", "--verify-data", str(repo_path))

    def test_path_outside_is_refused(self, sshd, tmp_path, base_dir):
        """A repository path outside --restrict-to-path is refused with AccessDenied."""
        outside = tmp_path / "outside"
        vbremote.Repository.init(vbremote.LocalTransport(outside), passphrase=PASSPHRASE, base_dir=base_dir).close()
        transport = sshd.transport(outside, key=sshd.forced_key)
        with pytest.raises(vbremote.AccessDenied, match="not allowed"):
            vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir)


class TestPruneThroughAppendOnlyKey:
    def test_refused_through_key_and_works_on_server(self, sshd, tmp_path, base_dir):
        """Pruning through the append-only key is refused; on the server, with a local transport, it works."""
        repo_path = sshd.forced_root / f"prune-{tmp_path.name}"
        admin = tmp_path / "admin-base"
        admin.mkdir()
        server = vbremote.LocalTransport(repo_path)
        vbremote.Repository.init(server, passphrase=PASSPHRASE, base_dir=admin).close()
        image = tmp_path / "disk.img"
        meta = metadata("dev")
        transport = sshd.transport(repo_path, key=sshd.forced_key, append_only=True)
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir) as repo:
            for n in range(3):
                image.write_bytes(disk_content(2, seed=n))
                repo.write_archive(f"dev-{n}", [vbremote.FileSpec(image, "d.img", vbremote.FileRole.DISK)], meta)
            with pytest.raises(vbremote.PruneRefused, match="append-only"):
                vbremote.Pruner(repo, vbremote.KeepRules(last=1)).prune("dev")
            assert len(repo.archives()) == 3
        with vbremote.Repository.open(server, passphrase=PASSPHRASE, base_dir=admin) as repo:
            result = vbremote.Pruner(repo, vbremote.KeepRules(last=1)).prune("dev")
            assert sorted(result.deleted) == ["dev-0", "dev-1"]
            assert result.freed_bytes
            assert repo.check(verify_data=True).ok


class TestSSHFetch:
    def test_fetch_pipeline_errors_and_cancel(self, sshd, tmp_path, base_dir):
        """Over SSH: distinct ids once in order, a missing id reported amid the rest, an early exit stays in step."""
        transport = sshd.transport(tmp_path / "repo")
        image = tmp_path / "disk.img"
        content = os.urandom(24 * 1024 * 1024)
        image.write_bytes(content)
        spec = vbremote.FileSpec(image, "disk.img", vbremote.FileRole.DISK)
        with vbremote.Repository.init(transport, passphrase=PASSPHRASE, base_dir=base_dir) as repo:
            repo.write_archive("a", [spec], metadata())
            refs = repo.chunk_list("a", "disk.img").chunks
            ids = [r.id for r in refs]
            missing = bytes(range(32))
            asked = [*ids[:5], missing, *ids[5:], *ids[:3]]
            with repo.fetch(asked, errors="report") as chunks:
                got = list(chunks)
            assert [c.id for c in got] == [*ids[:5], missing, *ids[5:]]
            assert [c.error.chunk_id for c in got if c.error is not None] == [missing.hex()]
            assert b"".join(c.data for c in got) == content
            with pytest.raises(vbremote.IntegrityError) as caught, repo.fetch([missing, *ids]) as chunks:
                list(chunks)
            assert caught.value.chunk_id == missing.hex()
            with repo.fetch(ids) as chunks:
                for chunk in chunks:
                    assert chunk.data == content[: len(chunk.data)]
                    break
            assert [a.name for a in repo.archives()] == ["a"]
            with repo.fetch(reversed(ids)) as chunks:
                assert b"".join(c.data for c in reversed(list(chunks))) == content

    def test_corrupt_chunk_reported_over_ssh(self, sshd, tmp_path, base_dir):
        """A damaged chunk on the server is reported by its id; every other chunk arrives intact."""
        transport = sshd.transport(tmp_path / "repo")
        image = tmp_path / "disk.img"
        content = os.urandom(8 * 1024 * 1024)
        image.write_bytes(content)
        spec = vbremote.FileSpec(image, "disk.img", vbremote.FileRole.DISK)
        with vbremote.Repository.init(transport, passphrase=PASSPHRASE, base_dir=base_dir) as repo:
            repo.write_archive("a", [spec], metadata())
            refs = repo.chunk_list("a", "disk.img").chunks
        segment = max((tmp_path / "repo" / "data").rglob("[0-9]*"), key=lambda p: p.stat().st_size)
        data = bytearray(segment.read_bytes())
        data[len(data) // 2] ^= 0xFF
        segment.write_bytes(bytes(data))
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir) as repo:
            with repo.fetch([r.id for r in refs], errors="report") as chunks:
                got = list(chunks)
            assert [c.id for c in got] == [r.id for r in refs]
            bad = [c for c in got if c.error is not None]
            assert len(bad) == 1
            assert bad[0].error.chunk_id == bad[0].id.hex()
            for ref, chunk in zip(refs, got, strict=True):
                if chunk.error is None:
                    assert chunk.data == content[ref.offset : ref.offset + ref.size]
            assert [a.name for a in repo.archives()] == ["a"]
