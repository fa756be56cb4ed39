"""TFRecord files in pure Python (no TensorFlow): crc32c, framing, writer, reader.

A TFRecord file is a sequence of frames: `uint64 length`, `uint32 masked crc32c(length)`, the
record's bytes, `uint32 masked crc32c(record)` (little-endian). `read_records` checks both CRCs of
every frame and raises `CorruptDataError` naming the file and the byte offset.
`write_shard` writes one whole shard file atomically and returns its manifest entry.
"""
from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from lottery.errors import CorruptDataError
from lottery.files import atomic_path


def _make_crc32c_py():
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)

    def crc32c_py(data: bytes) -> int:
        crc = 0xFFFFFFFF
        for b in memoryview(data).cast("B"):
            crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF

    return crc32c_py


crc32c_py = _make_crc32c_py()

try:  # the C implementation: ~GB/s
    import google_crc32c as _gcrc

    def crc32c(data: bytes) -> int:
        return _gcrc.value(bytes(data) if not isinstance(data, (bytes, bytearray)) else data)

    CRC32C_IMPLEMENTATION = "google_crc32c/" + str(getattr(_gcrc, "implementation", "?"))
except ImportError:  # pragma: no cover - exercised only without the package
    crc32c = crc32c_py
    CRC32C_IMPLEMENTATION = "python"

_MASK_DELTA = 0xA282EAD8


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked crc32c: rotate right by 15 bits and add a constant (mod 2**32)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF

def frame_record(record: bytes) -> bytes:
    """One TFRecord frame: length, masked crc of length, data, masked crc of data."""
    header = struct.pack("<Q", len(record))
    return b"".join((header, struct.pack("<I", masked_crc32c(header)), record,
                     struct.pack("<I", masked_crc32c(record))))


class TFRecordWriter:
    """Write a TFRecord file (uncompressed), keeping its sha256, byte and record counts."""

    def __init__(self, path: str | os.PathLike | BinaryIO):
        if hasattr(path, "write"):
            self._f = path
            self._own = False
            self.path = getattr(path, "name", "<stream>")
        else:
            self.path = str(path)
            self._f = open(self.path, "wb")
            self._own = True
        self._hash = hashlib.sha256()
        self.bytes = 0
        self.records = 0

    def write(self, record: bytes) -> None:
        frame = frame_record(record)
        self._f.write(frame)
        self._hash.update(frame)
        self.bytes += len(frame)
        self.records += 1

    def sha256(self) -> str:
        return self._hash.hexdigest()

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if self._own and not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()

    def __enter__(self) -> "TFRecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_records(path: str | os.PathLike, *, verify: bool = True) -> Iterator[bytes]:
    """Yield the records of one TFRecord file; `CorruptDataError` naming the byte offset on a CRC
    mismatch or truncation."""
    path = str(path)
    with open(path, "rb", buffering=1 << 20) as f:
        offset = 0
        while True:
            header = f.read(12)
            if not header:
                return
            if len(header) < 12:
                raise CorruptDataError(f"{path}: truncated record header at byte offset {offset}",
                                       path=path, offset=offset)
            length_bytes = header[:8]
            (length,) = struct.unpack("<Q", length_bytes)
            (length_crc,) = struct.unpack("<I", header[8:])
            if verify and masked_crc32c(length_bytes) != length_crc:
                raise CorruptDataError(f"{path}: corrupt record at byte offset {offset}: length crc mismatch",
                                       path=path, offset=offset)
            data = f.read(length)
            footer = f.read(4)
            if len(data) < length or len(footer) < 4:
                raise CorruptDataError(
                    f"{path}: truncated record at byte offset {offset} (expected {length} data bytes)",
                    path=path, offset=offset)
            if verify and masked_crc32c(data) != struct.unpack("<I", footer)[0]:
                raise CorruptDataError(f"{path}: corrupt record at byte offset {offset}: data crc mismatch",
                                       path=path, offset=offset)
            yield data
            offset += 16 + length


def record_offsets(path: str | os.PathLike) -> list[int]:
    """The byte offset of every record of one TFRecord file (a scan of the headers: each length's
    CRC is checked, the data are not read).  `CorruptDataError` names the file and the offset."""
    path = str(path)
    offsets = []
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        offset = 0
        while offset < size:
            header = f.read(12)
            if len(header) < 12:
                raise CorruptDataError(f"{path}: truncated record header at byte offset {offset}",
                                       path=path, offset=offset)
            (length,) = struct.unpack("<Q", header[:8])
            if masked_crc32c(header[:8]) != struct.unpack("<I", header[8:])[0]:
                raise CorruptDataError(f"{path}: corrupt record at byte offset {offset}: length crc mismatch",
                                       path=path, offset=offset)
            if offset + 16 + length > size:
                raise CorruptDataError(
                    f"{path}: truncated record at byte offset {offset} (expected {length} data bytes)",
                    path=path, offset=offset)
            offsets.append(offset)
            offset += 16 + length
            f.seek(offset)
    return offsets


def read_record_at(f: BinaryIO, path: str, offset: int) -> bytes:
    """The record whose frame starts at `offset` of the open file `f` (both CRCs checked)."""
    f.seek(offset)
    header = f.read(12)
    (length,) = struct.unpack("<Q", header[:8]) if len(header) == 12 else (-1,)
    if length < 0 or masked_crc32c(header[:8]) != struct.unpack("<I", header[8:])[0]:
        raise CorruptDataError(f"{path}: corrupt record at byte offset {offset}: bad header",
                               path=path, offset=offset)
    data = f.read(length + 4)
    if len(data) < length + 4:
        raise CorruptDataError(f"{path}: truncated record at byte offset {offset} (expected {length} data bytes)",
                               path=path, offset=offset)
    if masked_crc32c(data[:length]) != struct.unpack("<I", data[length:])[0]:
        raise CorruptDataError(f"{path}: corrupt record at byte offset {offset}: data crc mismatch",
                               path=path, offset=offset)
    return data[:length]


def write_shard(path: str | os.PathLike, records: Iterable[bytes]) -> dict:
    """Write serialised Examples to one TFRecord file atomically; returns its manifest entry."""
    path = Path(path)
    with atomic_path(path) as tmp, TFRecordWriter(tmp) as w:
        for r in records:
            w.write(r)
    return {"file": path.name, "records": w.records, "sha256": w.sha256(), "bytes": w.bytes}
