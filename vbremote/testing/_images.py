"""Real disk images for tests, demos and benchmarks, made with qemu's tools."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

from .._errors import ConfigurationError

__all__ = ["MIB", "guest_write", "make_vdi", "mixed_content", "qemu_tools_available"]

MIB = 1 << 20

_WORDS = (
    b"virtualbox snapshot borg archive restore chunk block journal guest host disk "
    b"kernel module network interface memory page cache inode extent journal "
)


def qemu_tools_available() -> bool:
    """Whether ``qemu-img`` and ``qemu-io`` are on PATH."""
    return shutil.which("qemu-img") is not None and shutil.which("qemu-io") is not None


def _qemu(*argv: str, cwd: Path | None = None) -> None:
    tool = argv[0]
    if shutil.which(tool) is None:
        raise ConfigurationError(f"{tool} is not installed (Debian package qemu-utils)")
    result = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=cwd)
    if result.returncode != 0:
        raise ConfigurationError(f"{' '.join(argv)} failed: {result.stderr.strip()}")


def mixed_content(size: int, *, seed: int = 0) -> Iterable[bytes]:
    """Guest-like content in 1 MiB blocks: random, text, zeros and repeated blocks.

    The mix (roughly 35 % random, 25 % text, 25 % zeros, 15 % repeats of
    earlier blocks) gives compression, zero detection and deduplication
    something real to do. Memory stays at a few blocks whatever the size: an
    earlier block is made again from the random state it was made with.
    """
    if size % MIB:
        raise ConfigurationError("size must be a whole number of MiB")
    rng = random.Random(seed)
    # How to make each earlier non-zero block again: its kind and the state it was made from.
    earlier: list[tuple[bool, tuple[object, ...]]] = []
    for _ in range(size // MIB):
        pick = rng.random()
        if pick < 0.60:
            text = pick >= 0.35
            recipe = (text, rng.getstate())
            block = _made(text, rng)
        elif pick < 0.85 or not earlier:
            block = bytes(MIB)
        else:
            recipe = rng.choice(earlier)
            text, state = recipe
            again = random.Random()
            again.setstate(state)
            block = _made(text, again)
        if any(block[:64]):
            earlier.append(recipe)
        yield block


def _made(text: bool, rng: random.Random) -> bytes:
    """One random or text block of :func:`mixed_content`, from ``rng``."""
    if not text:
        return rng.randbytes(MIB)
    words = bytearray()
    while len(words) < MIB:
        start = rng.randrange(len(_WORDS) - 40)
        words += _WORDS[start : start + rng.randrange(8, 40)] + b"%d\n" % rng.randrange(10**6)
    return bytes(words[:MIB])


def make_vdi(path: str | os.PathLike[str], size: int, *, seed: int = 0, content: bool = True) -> Path:
    """Make a dynamic VDI image of ``size`` bytes with :func:`mixed_content` (or empty).

    The guest content is written to a raw image first, then converted with
    ``qemu-img convert -O vdi``, so the result is a real VDI file that
    VirtualBox and qemu read.

    Raises:
        ConfigurationError: qemu-img is missing or failed.
    """
    target = Path(path)
    if not content:
        _qemu("qemu-img", "create", "-q", "-f", "vdi", os.fspath(target), str(size))
        return target
    raw = target.with_name(target.name + ".raw")
    try:
        with open(raw, "wb") as f:
            for block in mixed_content(size, seed=seed):
                if any(block):
                    f.write(block)
                else:
                    f.seek(len(block), os.SEEK_CUR)
            f.truncate(size)
        _qemu("qemu-img", "convert", "-q", "-O", "vdi", os.fspath(raw), os.fspath(target))
    finally:
        raw.unlink(missing_ok=True)
    return target


def guest_write(path: str | os.PathLike[str], offset: int, data: bytes, *, image_format: str = "vdi") -> None:
    """Write ``data`` at guest ``offset`` through the image format (as a guest's disk write would).

    Uses ``qemu-io``, so a VDI allocates new blocks exactly as a running VM's would.
    """
    image = Path(path).resolve()
    # qemu-io writes a file's bytes with "write -s FILE offset length", and splits
    # that command at spaces without quoting: the pattern file is named relative to
    # the image's folder (which may well have spaces, like "VirtualBox VMs").
    pattern_file = image.with_name(f".vbremote-guest-write-{os.getpid()}")
    try:
        pattern_file.write_bytes(data)
        _qemu(
            "qemu-io", "-f", image_format, "-c",
            f"write -s {pattern_file.name} {offset} {len(data)}", os.fspath(image),
            cwd=image.parent,
        )
    finally:
        pattern_file.unlink(missing_ok=True)
