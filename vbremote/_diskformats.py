"""What vbremote reads of disk image formats: where their data blocks start."""

from __future__ import annotations

import os
import struct

from ._models import Chunking

__all__ = ["disk_chunking"]

# VDI: "<<< ... >>>" text, then at 0x40 the signature, version, and for
# version 1.x the offsets of the block map and of the data area.
_VDI_SIGNATURE = 0xBEDA107F
_VDI_HEADER = struct.Struct("<II")  # signature, version
_VDI_OFFSETS_AT = 0x154  # offBlocks, offData (version 1.1 header)


def vdi_data_offset(head: bytes) -> int | None:
    """The offset of a VDI's data area, or None when ``head`` is not a VDI 1.1 header."""
    if len(head) < _VDI_OFFSETS_AT + 8:
        return None
    signature, version = _VDI_HEADER.unpack_from(head, 0x40)
    if signature != _VDI_SIGNATURE or version >> 16 != 1:
        return None
    _, data_offset = struct.unpack_from("<II", head, _VDI_OFFSETS_AT)
    return int(data_offset)


def disk_chunking(path: str | os.PathLike[str], block_size: int) -> Chunking:
    """The fixed chunking that keeps chunks aligned with the image's own blocks.

    VirtualBox puts a VDI's data area at a 1 MiB boundary, so plain blocks
    align; images made by other tools (qemu-img puts it right after the
    block map) get a header chunk that ends where the data area starts, so
    one guest block write still changes one chunk (borg's ``fixed,BLOCK,HEADER``).
    """
    with open(path, "rb") as f:
        head = f.read(512)
    data_offset = vdi_data_offset(head)
    if data_offset is None or data_offset % block_size == 0:
        return Chunking.fixed(block_size)
    if data_offset < block_size:
        return Chunking.fixed(block_size, data_offset)
    # A data area further out than one block: align what can be aligned.
    return Chunking.fixed(block_size, data_offset % block_size)
