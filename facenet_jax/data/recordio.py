"""The RecordIO byte format insightface ships its training sets in (MS1MV2, MS1MV3, Glint360K,
WebFace as `train.rec` + `train.idx` + `property`), read and written without mxnet.

Framing (dmlc-core `src/recordio.cc`, `include/dmlc/recordio.h`): each frame is the magic
0xced7230a, a little-endian uint32 `lrec` = cflag << 29 | length, then `length` bytes padded
with zeros to a multiple of 4. A payload that holds the magic at a 4-aligned offset is split
there into frames flagged 1 (first), 2 (middle), 3 (last), the magic itself dropped; the reader
puts it back between the parts. An unsplit payload is one frame with cflag 0.

Record header (mxnet `python/mxnet/recordio.py`, `IRHeader`): struct 'IfQQ' (uint32 flag,
float32 label, uint64 id, uint64 id2; 24 bytes). flag > 0: a float32 label vector of `flag`
entries follows the header (and the scalar label is written 0); then the payload (an encoded
image, or nothing).

Index (`MXIndexedRecordIO`): text lines `id<TAB>offset` giving each record's byte offset.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import pathlib
import struct
from typing import BinaryIO

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_BITS = 29
_MAX_LENGTH = (1 << _LENGTH_BITS) - 1
_FRAME_HEAD = 8  # magic + lrec
HEADER_FORMAT = "<IfQQ"  # mxnet's 'IfQQ' in native (little-endian) order
HEADER_SIZE = struct.calcsize(HEADER_FORMAT)  # 24


class RecordIOError(ValueError):
    """A pack that does not follow the format: names the file and the byte offset."""


@dataclasses.dataclass(frozen=True)
class RecordHeader:
    """mxnet's IRHeader. label: the scalar label, or float32 [flag] when flag > 0."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int

    @property
    def class_label(self) -> float:
        """The scalar label, or the first entry of a label vector (insightface's reading)."""
        return float(self.label[0]) if self.flag > 0 else float(self.label)


def frame(payload: bytes) -> bytes:
    """One record's bytes on disk, exactly as dmlc-core's RecordIOWriter::WriteRecord."""
    if len(payload) > _MAX_LENGTH:
        raise ValueError(f"a RecordIO record holds fewer than 2^29 bytes, got {len(payload)}")
    parts, start = [], 0
    for i in range(0, len(payload) - len(payload) % 4, 4):
        if payload[i:i + 4] == _MAGIC_BYTES:
            parts.append((1 if start == 0 else 2, payload[start:i]))
            start = i + 4
    parts.append((3 if start else 0, payload[start:]))
    out = bytearray()
    for cflag, part in parts:  # every part but the last has a length divisible by 4
        out += _MAGIC_BYTES + struct.pack("<I", cflag << _LENGTH_BITS | len(part)) + part
    out += bytes(-len(out) % 4)
    return bytes(out)


def pack_record(label: float | np.ndarray | list[float], payload: bytes = b"", *,
                id: int = 0, id2: int = 0) -> bytes:
    """IRHeader + payload, as mxnet's `recordio.pack`: a scalar label gives flag 0, a label
    vector gives flag = its length, its float32 entries after the header, label field 0."""
    if np.ndim(label) == 0:
        return struct.pack(HEADER_FORMAT, 0, float(label), id, id2) + payload
    vector = np.asarray(label, np.float32).ravel()
    return (struct.pack(HEADER_FORMAT, len(vector), 0.0, id, id2) + vector.astype("<f4").tobytes()
            + payload)


def unpack_record(record: bytes, where: str = "record") -> tuple[RecordHeader, bytes]:
    """(header, payload) of one record's bytes, as mxnet's `recordio.unpack`."""
    if len(record) < HEADER_SIZE:
        raise RecordIOError(f"{where}: {len(record)} bytes, shorter than the {HEADER_SIZE}-byte "
                            "record header")
    flag, label, id_, id2 = struct.unpack_from(HEADER_FORMAT, record)
    body = HEADER_SIZE
    if flag > 0:
        body += 4 * flag
        if len(record) < body:
            raise RecordIOError(f"{where}: header announces {flag} labels, the record holds "
                                f"{len(record)} bytes")
        label = np.frombuffer(record, "<f4", flag, HEADER_SIZE).astype(np.float32)
    return RecordHeader(flag, label, id_, id2), record[body:]


def read_index(path: str | pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """`train.idx` → (record ids int64 [N], byte offsets int64 [N]) in file order."""
    ids, offsets = [], []
    with open(path, encoding="ascii") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            try:
                ids.append(int(fields[0]))
                offsets.append(int(fields[1]))
            except (ValueError, IndexError):
                raise RecordIOError(f"{path}: line {number} is {line.strip()!r}, expected "
                                    "'<record id><TAB><byte offset>'") from None
    ids_array, offsets_array = np.asarray(ids, np.int64), np.asarray(offsets, np.int64)
    if len(np.unique(ids_array)) != len(ids_array):
        raise RecordIOError(f"{path}: a record id is listed twice")
    return ids_array, offsets_array


class RecordFile:
    """Random access to the records of a `.rec` file (memory-mapped, opened on first use so
    that an instance pickles to worker processes by its path alone)."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        self._map: mmap.mmap | None = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "_map": None}

    @property
    def size(self) -> int:
        return len(self._buffer())

    def _buffer(self) -> mmap.mmap:
        if self._map is None:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    raise RecordIOError(f"{self.path}: empty file, not a RecordIO pack")
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def read(self, offset: int) -> bytes:
        """The record whose first frame starts at byte `offset`, its parts joined (the magic
        put back between them). RecordIOError naming the file and offset when the bytes there
        are not a record's start or a frame runs past the end of the file."""
        buffer = self._buffer()
        parts, position = [], int(offset)
        while True:
            cflag, length = self._frame_head(buffer, position, offset)
            if not parts and cflag not in (0, 1):
                raise RecordIOError(f"{self.path}: offset {offset} is inside a record (frame "
                                    f"flag {cflag}), not at its start; is the .idx file the "
                                    "one written with this .rec?")
            if parts and cflag not in (2, 3):
                raise RecordIOError(f"{self.path}: record at offset {offset}: frame at "
                                    f"{position} has flag {cflag}, expected a continuation "
                                    "(2 or 3): the file is corrupt")
            start = position + _FRAME_HEAD
            if start + length > len(buffer):
                raise RecordIOError(f"{self.path}: record at offset {offset}: frame at "
                                    f"{position} announces {length} bytes past the end of the "
                                    f"file ({len(buffer)} bytes): truncated or corrupt")
            parts.append(buffer[start:start + length])
            position = start + length + (-length % 4)
            if cflag in (0, 3):
                return _MAGIC_BYTES.join(parts)

    def _frame_head(self, buffer: mmap.mmap, position: int, offset: int) -> tuple[int, int]:
        if position < 0 or position % 4 or position + _FRAME_HEAD > len(buffer):
            raise RecordIOError(f"{self.path}: offset {position} (record at {offset}) is not a "
                                f"4-aligned frame start inside the file ({len(buffer)} bytes)")
        magic, lrec = struct.unpack_from("<II", buffer, position)
        if magic != MAGIC:
            raise RecordIOError(f"{self.path}: no RecordIO magic at offset {position} (record "
                                f"at {offset}; found 0x{magic:08x}): corrupt file, or an .idx "
                                "offset that does not land on a record")
        return lrec >> _LENGTH_BITS, lrec & _MAX_LENGTH

    def read_header(self, offset: int) -> RecordHeader:
        """Only the IRHeader of the record at `offset` (its payload is not copied)."""
        buffer = self._buffer()
        cflag, length = self._frame_head(buffer, int(offset), int(offset))
        if cflag == 0 and length >= HEADER_SIZE:
            head = buffer[offset + _FRAME_HEAD:offset + _FRAME_HEAD + min(length, 4096)]
            if struct.unpack_from("<I", head)[0] * 4 + HEADER_SIZE <= len(head):
                return unpack_record(head, f"{self.path}: record at offset {offset}")[0]
        record = self.read(offset)
        return unpack_record(record, f"{self.path}: record at offset {offset}")[0]

    def check_record_starts(self, offsets: np.ndarray, chunk: int = 1 << 20) -> None:
        """RecordIOError naming the first of `offsets` (int [N]) that is not where a record
        starts (outside the file, unaligned, no magic, or a continuation frame). Reads the
        8-byte frame head at each offset, vectorised: seconds for millions of records."""
        offsets = np.asarray(offsets, np.int64)
        size = self.size
        outside = (offsets < 0) | (offsets % 4 != 0) | (offsets + _FRAME_HEAD > size)
        if outside.any():
            self.read(int(offsets[np.argmax(outside)]))  # raises, naming the offset
        buffer = np.frombuffer(self._buffer(), np.uint8)
        try:
            for start in range(0, len(offsets), chunk):
                part = offsets[start:start + chunk]
                heads = buffer[part[:, None] + np.arange(_FRAME_HEAD)].view("<u4")
                bad = (heads[:, 0] != MAGIC) | ((heads[:, 1] >> _LENGTH_BITS) > 1)
                if bad.any():
                    self.read(int(part[np.argmax(bad)]))  # raises, naming the offset
        finally:
            del buffer  # the map cannot close while a view of it exists

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


class PackWriter:
    """Writes `NAME.rec` and `NAME.idx` as mxnet's MXIndexedRecordIO does (each record's id
    and the offset it starts at, one `id<TAB>offset` line per record). A context manager."""

    def __init__(self, rec_path: str | pathlib.Path, idx_path: str | pathlib.Path):
        self.rec_path, self.idx_path = pathlib.Path(rec_path), pathlib.Path(idx_path)
        self._rec: BinaryIO = open(self.rec_path, "wb")
        self._idx = open(self.idx_path, "w", encoding="ascii")
        self._ids: set[int] = set()

    def write(self, record_id: int, record: bytes) -> None:
        if record_id in self._ids:
            raise ValueError(f"record id {record_id} written twice")
        self._ids.add(record_id)
        self._idx.write(f"{record_id}\t{self._rec.tell()}\n")
        self._rec.write(frame(record))

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self) -> PackWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
