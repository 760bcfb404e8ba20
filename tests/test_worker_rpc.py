"""The worker RPC: every reply matches its request, cancels roll back, interrupts close, nothing deadlocks."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from contextlib import closing, suppress
from pathlib import Path

import pytest
from helpers import PASSPHRASE, BorgCLI, disk_content, metadata

import vbremote
from vbremote._borg import _protocol
from vbremote.testing import MIB


def write_disk(tmp_path: Path, content: bytes, name: str = "disk.img") -> vbremote.FileSpec:
    path = tmp_path / name
    path.write_bytes(content)
    return vbremote.FileSpec(path, name, vbremote.FileRole.DISK)


def stored_ids(repo: vbremote.Repository, tmp_path: Path, blocks: int = 32) -> list[bytes]:
    """Write an archive of ``blocks`` random MiB and return its chunk ids."""
    spec = write_disk(tmp_path, os.urandom(blocks * MIB), "data.img")
    repo.write_archive("data", [spec], metadata())
    return [c.id for c in repo.chunk_list("data", spec.path).chunks]


def in_thread(action: Callable[[], object], timeout: float = 30) -> list[BaseException]:
    """Run ``action`` in a thread; fail if it has not returned after ``timeout`` seconds."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still blocked after {timeout} seconds"
    return errors


def interrupt_soon(delay: float = 0.5) -> threading.Timer:
    """Deliver SIGINT to this process (a KeyboardInterrupt in the main thread) after ``delay`` seconds."""
    timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    return timer


def names(borg_cli: BorgCLI, repo_path: str) -> list[str]:
    return borg_cli("list", "--short", repo_path).split()


class TestCancel:
    def test_error_from_callback_cancels_the_write(self, repo, transport, borg_cli, tmp_path):
        """A VBRemoteError raised by the progress callback cancels: nothing committed, the repository in step."""
        spec = write_disk(tmp_path, disk_content(64, seed=1))

        def cancel(event: vbremote.Progress) -> None:
            if event.done > 0:  # the first event: after the first block, mid-write
                raise vbremote.ConfigurationError("stop here")

        with pytest.raises(vbremote.ConfigurationError, match="stop here"):
            repo.write_archive("cancelled", [spec], metadata(), progress=cancel)
        assert repo.archives() == []
        assert repo.archives() == []
        repo.write_archive("next", [spec], metadata())
        assert [a.name for a in repo.archives()] == ["next"]
        repo.close()
        assert names(borg_cli, transport.path) == ["next"]
        borg_cli("check", "--verify-data", transport.path)

    def test_cancelled_write_rolls_back_in_the_worker(self, repo, transport, tmp_path):
        """A cancelled write leaves the same worker usable: no reconnect, no stale transaction, the name is free."""
        spec = write_disk(tmp_path, disk_content(64, seed=2))
        pid = repo._worker._process.pid

        def cancel(event: vbremote.Progress) -> None:
            if event.done > 0:  # the first event: after the first block, mid-write
                raise RuntimeError("caller gave up")

        with pytest.raises(RuntimeError, match="caller gave up"):
            repo.write_archive("a", [spec], metadata(), progress=cancel)
        assert repo._worker._process.poll() is None
        assert repo._worker._process.pid == pid
        result = repo.write_archive("a", [spec], metadata())
        assert result.archive.name == "a"
        assert repo.check(verify_data=True).ok

    def test_cancel_at_the_last_block_commits_nothing(self, repo, transport, borg_cli, tmp_path):
        """A callback raising on the very last progress event (the worker is about to commit) still commits nothing."""
        spec = write_disk(tmp_path, disk_content(8, seed=3))
        for attempt in range(3):

            def last(event: vbremote.Progress) -> None:
                if event.done == event.total:
                    raise RuntimeError("too late?")

            with pytest.raises(RuntimeError, match="too late"):
                repo.write_archive(f"late-{attempt}", [spec], metadata(), progress=last)
            assert repo.archives() == []
        repo.close()
        assert names(borg_cli, transport.path) == []


class TestInterrupt:
    def test_interrupt_while_a_stream_is_read(self, repo, tmp_path):
        """A KeyboardInterrupt landing while a fetch waits on the worker closes the repository with a clear error."""
        ids = stored_ids(repo, tmp_path)
        chunks = repo.fetch_chunks(ids)
        next(chunks)
        pid = repo._worker._process.pid
        os.kill(pid, signal.SIGSTOP)  # the next read blocks, so the interrupt lands inside it
        timer = interrupt_soon()
        try:
            with pytest.raises(KeyboardInterrupt):
                for _ in chunks:
                    pass
        finally:
            timer.cancel()
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        with pytest.raises(vbremote.RepositoryError, match="interrupted; open it again"):
            repo.archives()
        repo.close()

    def test_interrupt_while_a_cancel_drains(self, repo, tmp_path):
        """An interrupt while leaving a fetch early waits on a stalled worker: closed, clear error, no lock left."""
        ids = stored_ids(repo, tmp_path)
        pid = repo._worker._process.pid

        def leave_early() -> None:
            with repo.fetch(ids) as chunks:
                for _ in chunks:
                    os.kill(pid, signal.SIGSTOP)  # the cancel's drain now waits on the worker
                    break

        timer = interrupt_soon()
        try:
            with pytest.raises(KeyboardInterrupt):
                leave_early()
        finally:
            timer.cancel()
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        errors = in_thread(repo.archives)
        assert len(errors) == 1
        assert "interrupted; open it again" in str(errors[0])

    def test_interrupt_while_a_call_waits(self, repo, transport, base_dir, tmp_path):
        """A KeyboardInterrupt landing while a call waits on the worker kills it; nothing is committed."""
        spec = write_disk(tmp_path, disk_content(32, seed=4))
        pid = repo._worker._process.pid
        stopped = []

        def stop_worker(event: vbremote.Progress) -> None:
            if event.done > 0 and not stopped:  # the first event: mid-write
                stopped.append(True)
                os.kill(pid, signal.SIGSTOP)

        timer = interrupt_soon(1.0)
        try:
            with pytest.raises(KeyboardInterrupt):
                repo.write_archive("a", [spec], metadata(), progress=stop_worker)
        finally:
            timer.cancel()
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        with pytest.raises(vbremote.RepositoryError, match="interrupted; open it again"):
            repo.archives()
        repo.close()
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir, lock_wait=5) as again:
            assert again.archives() == []

    def test_interrupt_after_commit_go(self, repo, transport, base_dir, borg_cli, tmp_path, monkeypatch):
        """An interrupt just after the go-ahead closes the repository; the error names the archive (whole or absent)."""
        spec = write_disk(tmp_path, disk_content(8, seed=9))
        worker = repo._worker
        post = worker._post

        def interrupted_after_go(message: object) -> None:
            post(message)
            if isinstance(message, _protocol.Decision) and message.go:
                raise KeyboardInterrupt

        monkeypatch.setattr(worker, "_post", interrupted_after_go)
        with pytest.raises(KeyboardInterrupt):
            repo.write_archive("maybe", [spec], metadata())
        with pytest.raises(vbremote.RepositoryError, match="archive 'maybe', which may or may not exist"):
            repo.archives()
        repo.close()
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir, lock_wait=5) as again:
            listed = [a.name for a in again.archives()]
            assert listed in ([], ["maybe"])
            assert again.check(verify_data=True).ok
        assert names(borg_cli, transport.path) == listed

    def test_interrupt_from_callback_cancels(self, repo, transport, borg_cli, tmp_path):
        """A KeyboardInterrupt raised by the progress callback cancels the write and the repository stays usable."""
        spec = write_disk(tmp_path, disk_content(32, seed=5))

        def interrupt(event: vbremote.Progress) -> None:
            if event.done > 0:  # the first event: after the first block, mid-write
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            repo.write_archive("a", [spec], metadata(), progress=interrupt)
        assert repo.archives() == []
        repo.write_archive("b", [spec], metadata())
        repo.close()
        assert names(borg_cli, transport.path) == ["b"]

    def test_interrupt_from_the_consumer_loop(self, repo, tmp_path):
        """A KeyboardInterrupt raised in the loop over a fetch cancels the stream; the next calls are in step."""
        ids = stored_ids(repo, tmp_path)

        def consume() -> None:
            with closing(repo.fetch_chunks(ids)) as chunks:
                for _ in chunks:
                    raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            consume()
        assert [a.name for a in repo.archives()] == ["data"]
        assert sum(1 for _ in repo.fetch_chunks(ids)) == len(ids)


class TestInStep:
    def test_forged_reply_is_detected(self, repo, tmp_path):
        """A reply carrying another request's id is a loud error that closes the repository, never a silent result."""
        stored_ids(repo, tmp_path, blocks=2)
        # A request the parent never made: the worker answers it first, with its id.
        repo._worker._requests.send(_protocol.Request(id=10**6, op="archives", args={}))
        with pytest.raises(vbremote.RepositoryError, match="out of step") as caught:
            repo.archives()
        assert "open it again" in str(caught.value)
        with pytest.raises(vbremote.RepositoryError, match="closed"):
            repo.archives()

    def test_chunks_larger_than_the_pipe_arrive_whole(self, repo, tmp_path):
        """A fetched chunk's bytes follow its reply raw; one four times the pipe's size is read back whole."""
        content = os.urandom(12 * MIB)
        (tmp_path / "big.img").write_bytes(content)
        spec = vbremote.FileSpec(tmp_path / "big.img", "big.img", vbremote.FileRole.DISK)
        repo.write_archive("big", [spec], metadata(), block_size=4 * MIB)
        chunks = repo.chunk_list("big", "big.img").chunks
        assert [c.size for c in chunks] == [4 * MIB] * 3
        with repo.fetch([c.id for c in reversed(chunks)]) as stream:
            fetched = list(stream)
        assert [f.id for f in fetched] == [c.id for c in reversed(chunks)]
        assert b"".join(f.data for f in reversed(fetched)) == content
        assert all(type(f.data) is bytes for f in fetched)
        # In step afterwards: the next call reads its own reply, not left-over chunk bytes.
        assert [a.name for a in repo.archives()] == ["big"]

    def test_abandoned_stream_does_not_hang_close(self, repo, tmp_path):
        """close() after a started, abandoned fetch returns promptly (an error inside ``with repo:``)."""
        ids = stored_ids(repo, tmp_path)

        def fail_inside() -> None:
            with repo:
                chunks = repo.fetch_chunks(ids)
                next(chunks)
                raise RuntimeError("the caller's own failure")

        def scenario() -> None:
            with pytest.raises(RuntimeError):
                fail_inside()

        assert in_thread(scenario) == []
        assert repo._worker._process.poll() is not None

    def test_abandoned_stream_then_other_calls(self, repo, tmp_path):
        """Closing a half-read fetch iterator leaves the repository in step for the next calls."""
        ids = stored_ids(repo, tmp_path)
        chunks = repo.fetch_chunks(ids)
        next(chunks)
        chunks.close()
        assert [a.name for a in repo.archives()] == ["data"]
        assert [i for i, _ in repo.fetch_chunks(ids[:3])] == ids[:3]

    def test_same_thread_reentry_raises(self, repo, tmp_path):
        """A call from the thread that holds an open fetch raises RepositoryBusy at once instead of deadlocking."""
        ids = stored_ids(repo, tmp_path)

        def scenario() -> None:
            chunks = repo.fetch_chunks(ids)
            next(chunks)
            with pytest.raises(vbremote.RepositoryBusy):
                repo.archives()
            chunks.close()
            assert len(repo.archives()) == 1

        assert in_thread(scenario) == []

    def test_reentry_from_a_callback_raises(self, repo, tmp_path):
        """A progress callback that calls back into its repository gets RepositoryBusy, which cancels the write."""
        spec = write_disk(tmp_path, disk_content(4, seed=6))

        def reenter(event: vbremote.Progress) -> None:
            repo.archives()

        def scenario() -> None:
            with pytest.raises(vbremote.RepositoryBusy):
                repo.write_archive("a", [spec], metadata(), progress=reenter)
            assert repo.archives() == []

        assert in_thread(scenario) == []

    def test_other_threads_wait(self, repo, tmp_path):
        """Another thread's call waits for an open fetch to finish, then runs."""
        ids = stored_ids(repo, tmp_path, blocks=4)
        results: list[int] = []
        with closing(repo.fetch_chunks(ids)) as chunks:
            next(chunks)
            other = threading.Thread(target=lambda: results.append(len(repo.archives())))
            other.start()
            other.join(0.5)
            assert other.is_alive()
            assert sum(1 for _ in chunks) == len(ids) - 1
        other.join(30)
        assert results == [1]


class TestWorkerStart:
    def test_the_current_folder_cannot_shadow_borg_or_vbremote(self, tmp_path, base_dir, monkeypatch):
        """A `borg` or `vbremote` folder in the caller's working folder is never what the worker imports."""
        shadow = tmp_path / "cwd"
        for name in ("borg", "vbremote"):
            (shadow / name).mkdir(parents=True)
            (shadow / name / "__init__.py").write_text(f"raise ImportError('the {name} of the working folder')\n")
        monkeypatch.chdir(shadow)
        transport = vbremote.LocalTransport(tmp_path / "repo")
        vbremote.Repository.init(transport, passphrase=PASSPHRASE, base_dir=base_dir).close()
        with vbremote.Repository.open(transport, passphrase=PASSPHRASE, base_dir=base_dir) as repo:
            assert repo.archives() == []


class TestKeyGuard:
    def test_nonce_reservations_take_the_repository_lock(self):
        """borg's nonce manager asks the repository for reservations only while holding the write's repository lock."""
        from vbremote._borg._worker import _guard_key

        lock = threading.Lock()
        held: list[bool] = []

        class NonceManager:
            def get_repo_free_nonce(self) -> int:
                held.append(lock.locked())
                return 7

            def commit_repo_nonce_reservation(self, following: int, start: int) -> None:
                held.append(lock.locked())

        class Key:
            nonce_manager = NonceManager()

        key = Key()
        _guard_key(key, lock)
        assert key.nonce_manager.get_repo_free_nonce() == 7
        key.nonce_manager.commit_repo_nonce_reservation(9, 7)
        assert held == [True, True]
        assert not lock.locked()
