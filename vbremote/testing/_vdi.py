"""VDI disk images, dynamic and differencing, as the simulated VirtualBox keeps them.

The layout is VirtualBox's own (VDI 1.1): a 512-byte header, a block map of
32-bit entries, then the data blocks (1 MiB by default) appended in
allocation order, the data area starting at a 1 MiB boundary as VirtualBox
starts it. A block map entry is the block's index in the data area, or
``UNALLOCATED`` (read as zeros, or from the parent of a differencing
image), or ``ZERO`` (discarded: reads as zeros). ``qemu-img`` reads the
dynamic images written here.

A differencing image records its parent's uuid; reading a block it does not
have reads the parent's. :meth:`VDI.merge_into_parent` copies a child's
blocks into its parent, as VirtualBox does when a snapshot is deleted.
"""

from __future__ import annotations

import os
import struct
import uuid as uuid_module
from pathlib import Path
from typing import BinaryIO

from attrs import define

from .._errors import ConfigurationError

__all__ = ["VDI", "VDI_BLOCK_SIZE"]

VDI_BLOCK_SIZE = 1 << 20
SIGNATURE = 0xBEDA107F
VERSION = 0x00010001
TYPE_DYNAMIC = 1
TYPE_DIFF = 4
UNALLOCATED = 0xFFFFFFFF
ZERO = 0xFFFFFFFE
_TEXT = b"<<< Oracle VM VirtualBox Disk Image >>>\n"
# text, signature, version, header size, type, flags, description, block map and
# data offsets, legacy geometry (cylinders, heads, sectors, sector size), unused,
# disk size, block size, block extra, blocks, allocated blocks, then the uuids:
# this image, its last modification, its parent (linkage), the parent's modification.
_HEADER = struct.Struct("<64s IIIII 256s II IIII I Q II II 16s16s16s16s 56x")
_DATA_ALIGN = 1 << 20
_SECTOR = 512


_NIL = str(uuid_module.UUID(int=0))


@define
class _Header:
    image_type: int
    offset_bmap: int
    offset_data: int
    disk_size: int
    blocks: int
    allocated: int
    uuid: str
    modification: str
    parent_uuid: str
    parent_modification: str

    def pack(self) -> bytes:
        return _HEADER.pack(
            _TEXT.ljust(64, b"\0"), SIGNATURE, VERSION, 0x180, self.image_type, 0, b"",
            self.offset_bmap, self.offset_data, 0, 0, 0, _SECTOR, 0,
            self.disk_size, VDI_BLOCK_SIZE, 0, self.blocks, self.allocated,
            uuid_module.UUID(self.uuid).bytes_le, uuid_module.UUID(self.modification).bytes_le,
            uuid_module.UUID(self.parent_uuid).bytes_le, uuid_module.UUID(self.parent_modification).bytes_le,
        )

    @classmethod
    def unpack(cls, head: bytes, path: Path) -> _Header:
        (_, signature, version, _, image_type, _, _, offset_bmap, offset_data, _, _, _, _, _,
         disk_size, block_size, _, blocks, allocated, u_image, u_mod, u_parent, u_parent_mod) = _HEADER.unpack(head)
        if signature != SIGNATURE or version != VERSION:
            raise ConfigurationError(f"{path} is not a VDI 1.1 image")
        if block_size != VDI_BLOCK_SIZE or image_type not in (TYPE_DYNAMIC, TYPE_DIFF):
            raise ConfigurationError(f"{path}: unsupported VDI (block size {block_size}, type {image_type})")
        return cls(
            image_type=image_type,
            offset_bmap=offset_bmap,
            offset_data=offset_data,
            disk_size=disk_size,
            blocks=blocks,
            allocated=allocated,
            uuid=str(uuid_module.UUID(bytes_le=u_image)),
            modification=str(uuid_module.UUID(bytes_le=u_mod)),
            parent_uuid=str(uuid_module.UUID(bytes_le=u_parent)),
            parent_modification=str(uuid_module.UUID(bytes_le=u_parent_mod)),
        )


class VDI:
    """An open VDI image file.

    Use :meth:`create` or :meth:`create_diff` to make one and :meth:`open` to
    open one; :meth:`read` and :meth:`write` work at guest offsets.
    """

    def __init__(self, path: Path, header: _Header, block_map: list[int], parent: VDI | None) -> None:
        self.path = path
        self.header = header
        self.block_map = block_map
        self.parent = parent

    # -- making and opening -------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike[str], size: int, *, image_uuid: str | None = None) -> VDI:
        """A new, empty dynamic image of ``size`` bytes (a whole number of MiB)."""
        return cls._create(Path(path), size, TYPE_DYNAMIC, image_uuid, parent=None)

    @classmethod
    def create_diff(cls, path: str | os.PathLike[str], parent: VDI, *, image_uuid: str | None = None) -> VDI:
        """A new, empty differencing image on top of ``parent``."""
        return cls._create(Path(path), parent.size, TYPE_DIFF, image_uuid, parent=parent)

    @classmethod
    def _create(cls, path: Path, size: int, image_type: int, image_uuid: str | None, parent: VDI | None) -> VDI:
        if size <= 0 or size % VDI_BLOCK_SIZE:
            raise ConfigurationError("a VDI's size must be a positive whole number of MiB")
        blocks = size // VDI_BLOCK_SIZE
        offset_bmap = _SECTOR
        offset_data = -(-(offset_bmap + 4 * blocks) // _DATA_ALIGN) * _DATA_ALIGN
        header = _Header(
            image_type=image_type,
            offset_bmap=offset_bmap,
            offset_data=offset_data,
            disk_size=size,
            blocks=blocks,
            allocated=0,
            uuid=str(uuid_module.UUID(image_uuid)) if image_uuid else str(uuid_module.uuid4()),
            modification=str(uuid_module.uuid4()),
            parent_uuid=parent.uuid if parent else _NIL,
            parent_modification=parent.header.modification if parent else _NIL,
        )
        image = cls(path, header, [UNALLOCATED] * blocks, parent)
        with open(path, "xb") as f:
            f.write(header.pack())
            f.write(struct.pack(f"<{blocks}I", *image.block_map))
            f.truncate(offset_data)
        return image

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, parent: VDI | None = None) -> VDI:
        """Open an image; a differencing image needs its ``parent`` (checked by uuid).

        Raises:
            ConfigurationError: Not a VDI 1.1 image, or the wrong parent.
        """
        path = Path(path)
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
            if len(head) < _HEADER.size:
                raise ConfigurationError(f"{path} is too short for a VDI header")
            header = _Header.unpack(head, path)
            f.seek(header.offset_bmap)
            block_map = list(struct.unpack(f"<{header.blocks}I", f.read(4 * header.blocks)))
        is_diff = header.image_type == TYPE_DIFF
        if is_diff and (parent is None or parent.uuid != header.parent_uuid):
            raise ConfigurationError(f"{path} is a differencing image of {header.parent_uuid}: give its parent")
        return cls(path, header, block_map, parent if is_diff else None)

    # -- properties ---------------------------------------------------------

    @property
    def size(self) -> int:
        """The guest-visible size in bytes."""
        return self.header.disk_size

    @property
    def uuid(self) -> str:
        """The image's uuid."""
        return self.header.uuid

    @property
    def is_diff(self) -> bool:
        """Whether this is a differencing image."""
        return self.header.image_type == TYPE_DIFF

    # -- reading and writing --------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ConfigurationError(f"range {offset}+{length} is outside the {self.size}-byte disk")

    def read_block(self, index: int) -> bytes:
        """One whole 1 MiB guest block, through the parents."""
        entry = self.block_map[index]
        if entry == UNALLOCATED:
            return self.parent.read_block(index) if self.parent else bytes(VDI_BLOCK_SIZE)
        if entry == ZERO:
            return bytes(VDI_BLOCK_SIZE)
        with open(self.path, "rb") as f:
            f.seek(self.header.offset_data + entry * VDI_BLOCK_SIZE)
            data = f.read(VDI_BLOCK_SIZE)
        return data.ljust(VDI_BLOCK_SIZE, b"\0")

    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes ``[offset, offset + length)``."""
        self._check_range(offset, length)
        out = bytearray()
        while length:
            index, within = divmod(offset, VDI_BLOCK_SIZE)
            take = min(length, VDI_BLOCK_SIZE - within)
            out += self.read_block(index)[within : within + take]
            offset += take
            length -= take
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        """Write guest bytes at ``offset`` (allocating blocks as VirtualBox does: appended)."""
        self._check_range(offset, len(data))
        position = 0
        with open(self.path, "r+b") as f:
            while position < len(data):
                index, within = divmod(offset + position, VDI_BLOCK_SIZE)
                take = min(len(data) - position, VDI_BLOCK_SIZE - within)
                piece = data[position : position + take]
                if self.block_map[index] in (UNALLOCATED, ZERO):
                    base = bytearray(self.read_block(index))
                    base[within : within + take] = piece
                    self._append_block(f, index, bytes(base))
                else:
                    f.seek(self.header.offset_data + self.block_map[index] * VDI_BLOCK_SIZE + within)
                    f.write(piece)
                position += take

    def _append_block(self, f: BinaryIO, index: int, block: bytes) -> None:
        # Data first, then the map entry, then the header's count: a crash
        # in between leaves an unreferenced block, never a dangling entry.
        allocated = self.header.allocated
        f.seek(self.header.offset_data + allocated * VDI_BLOCK_SIZE)
        f.write(block)
        self.block_map[index] = allocated
        self.header.allocated = allocated + 1
        f.seek(self.header.offset_bmap + 4 * index)
        f.write(struct.pack("<I", allocated))
        f.seek(0)
        f.write(self.header.pack())

    def merge_into_parent(self) -> VDI:
        """Copy this differencing image's blocks into its parent; returns the parent.

        The child file is left in place for the caller to remove (VirtualBox
        deletes it once the merge succeeded).
        """
        if self.parent is None:
            raise ConfigurationError("only a differencing image can be merged into its parent")
        for index, entry in enumerate(self.block_map):
            if entry == UNALLOCATED:
                continue
            block = self.read_block(index)
            self.parent.write(index * VDI_BLOCK_SIZE, block)
        return self.parent

    def rebase(self, parent: VDI) -> None:
        """Record ``parent`` as this differencing image's parent (after its old parent was merged away)."""
        if not self.is_diff:
            raise ConfigurationError("only a differencing image has a parent")
        if parent.size != self.size:
            raise ConfigurationError(f"{parent.path} is {parent.size} bytes, {self.path} is {self.size}")
        self.header.parent_uuid = parent.uuid
        self.header.parent_modification = parent.header.modification
        self.parent = parent
        with open(self.path, "r+b") as f:
            f.write(self.header.pack())
