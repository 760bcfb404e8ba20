"""The network-namespace harness: rate limit both ways, link down and up, cleanup."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import PASSPHRASE
from netns_for_tests import NetnsLink, NetnsSSHD, NetnsUnavailable, link_with_sshd

import vbremote
from vbremote.testing import MIB

pytestmark = [pytest.mark.netns, pytest.mark.ssh]

RATE_MBIT = 50.0


@pytest.fixture(scope="module")
def link(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NetnsLink, NetnsSSHD]]:
    yield from link_with_sshd(RATE_MBIT, tmp_path_factory.mktemp("netns-sshd"))


def _timed(argv: list[str], **kwargs: object) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, **kwargs)  # type: ignore[call-overload]
    return time.perf_counter() - started


class TestRateLimit:
    def test_download_rate_is_the_configured_rate(self, link):
        """20 MiB from the namespace through ssh arrive at 50 Mbit/s within 20 %."""
        _, sshd = link
        handshake = min(_timed(sshd.ssh_argv("true")) for _ in range(2))
        size = 20 * MIB
        seconds = _timed(sshd.ssh_argv(f"head -c {size} /dev/urandom")) - handshake
        mbit = size * 8 / seconds / 1e6
        assert RATE_MBIT * 0.8 <= mbit <= RATE_MBIT * 1.2, mbit

    def test_upload_rate_is_the_configured_rate(self, link, tmp_path):
        """20 MiB to the namespace through ssh leave at 50 Mbit/s within 20 %, and the counters see them."""
        net, sshd = link
        size = 20 * MIB
        payload = tmp_path / "payload"
        payload.write_bytes(os.urandom(size))
        handshake = min(_timed(sshd.ssh_argv("true")) for _ in range(2))
        before = net.host_tx_bytes()
        with open(payload, "rb") as source:
            seconds = _timed(sshd.ssh_argv("cat > /dev/null"), stdin=source) - handshake
        mbit = size * 8 / seconds / 1e6
        assert RATE_MBIT * 0.8 <= mbit <= RATE_MBIT * 1.2, mbit
        assert size <= net.host_tx_bytes() - before <= size * 1.1


class TestLinkDown:
    def test_open_connection_fails_and_new_one_after_up_works(self, link):
        """With the link down a running ssh session dies (keep-alive) and a new one fails; after up both work."""
        net, sshd = link
        session = subprocess.Popen(
            sshd.ssh_argv("sleep 60", alive_seconds=2), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(1.5)
        assert session.poll() is None
        net.down()
        try:
            assert session.wait(timeout=15) != 0
            refused = subprocess.run(sshd.ssh_argv("true"), capture_output=True, text=True, timeout=30)
            assert refused.returncode == 255, refused.stderr
        finally:
            net.up()
        subprocess.run(sshd.ssh_argv("true"), check=True, capture_output=True, timeout=30)

    def test_repository_open_over_down_link_is_connection_failed(self, link, tmp_path):
        """Opening a repository through the down link raises ConnectionFailed; it opens after up."""
        net, sshd = link
        base = tmp_path / "base"
        base.mkdir()
        transport = sshd.transport(tmp_path / "repo", alive_seconds=2)
        vbremote.Repository.init(transport, passphrase=PASSPHRASE, base_dir=base).close()
        net.down()
        try:
            with pytest.raises(vbremote.ConnectionFailed):
                vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base)
        finally:
            net.up()
        vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base).close()


class TestCleanup:
    def test_everything_is_removed_even_after_an_error(self, tmp_path: Path):
        """An exception inside the block still removes the namespace, the veth pair and sshd."""
        try:
            with (  # noqa: PT012
                pytest.raises(ZeroDivisionError),
                NetnsLink.create(10.0) as net,
                NetnsSSHD.start(net, tmp_path / "sshd") as sshd,
            ):
                name, host_if, process = net.name, net.host_if, sshd.process
                assert process.pid in net.pids()
                raise ZeroDivisionError
        except NetnsUnavailable as error:
            pytest.skip(str(error))
        assert process.poll() is not None
        assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert not Path(f"/sys/class/net/{host_if}").exists()
