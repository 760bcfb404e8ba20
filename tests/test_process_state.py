"""The library changes none of its caller's process-wide state."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import json, logging, os, signal, sys, threading
    from pathlib import Path

    import vbremote

    def snapshot():
        umask = os.umask(0o022); os.umask(umask)
        return {
            "umask": umask,
            "cwd": os.getcwd(),
            "env": dict(os.environ),
            "root_handlers": [repr(h) for h in logging.getLogger().handlers],
            "root_level": logging.getLogger().level,
            "borg_logger_handlers": [repr(h) for h in logging.getLogger("borg").handlers],
            "signals": {
                s.name: repr(signal.getsignal(s))
                for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE, signal.SIGCHLD)
            },
            "stdin": repr(sys.stdin), "stdout": repr(sys.stdout), "stderr": repr(sys.stderr),
            "argv": list(sys.argv),
            "modules_borg": sorted(m for m in sys.modules if m == "borg" or m.startswith("borg.")),
        }

    work = Path(sys.argv[1])
    os.umask(0o027)
    before = snapshot()
    disk = work / "disk.img"
    disk.write_bytes(os.urandom(3 << 20))
    transport = vbremote.LocalTransport(work / "repo")
    with vbremote.Repository.init(transport, passphrase="p", base_dir=work / "base") as repo:
        repo.write_archive("a", [vbremote.FileSpec(disk, "disk.img", vbremote.FileRole.DISK)],
                           vbremote.SnapshotMetadata("vm", "0b8e1c6a-0000-4000-8000-000000000001"))
        ids = [c.id for c in repo.chunk_list("a", "disk.img").chunks]
        list(repo.fetch_chunks(ids))
        repo.local_chunk_ids(disk)
        repo.check()
    try:
        vbremote.Repository.open(transport, passphrase="wrong", base_dir=work / "base")
    except vbremote.PassphraseWrong:
        pass
    after = snapshot()
    print(json.dumps({"before": before, "after": after, "threads": threading.active_count()}))
    """
)


def test_caller_state_is_untouched(tmp_path: Path) -> None:
    """umask, cwd, environment, logging, signals, std streams and argv stay as they were; borg is not imported."""
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    before, after = report["before"], report["after"]
    assert before == after
    assert after["modules_borg"] == []
    assert after["umask"] == 0o027
