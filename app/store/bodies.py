"""How raw webhook bodies are stored: lz4-compressed when that pays.

A 14 KiB GitHub delivery is JSON with the same URLs and field names over and over; an lz4 frame
of it is ~3.3 KiB (a quarter) and costs ~10 µs to make, ~2 µs to read back. Stored raw, SQLite
writes it as four overflow pages, into the WAL and again at the checkpoint; compressed it fits
in one leaf page: storing deliveries in batches of 24 costs ~35 % less CPU, compression
included (bench/webhook_store_floor.py), and the inbox takes a quarter of the disk.

``webhook_deliveries.body_encoding`` says what ``body`` holds: ``NULL`` the raw bytes (rows
stored before migration 0008, small bodies, bodies lz4 cannot shrink), ``"lz4"`` a standard
lz4 frame (``lz4 -d`` reads it). Signatures are always checked on the raw bytes, before this.
"""

from __future__ import annotations

from typing import Final

import lz4.frame

LZ4: Final = "lz4"
#: bodies shorter than this are stored as they are (a frame's header and checksum would eat
#: most of the gain, and the row fits in its page anyway)
MIN_COMPRESS: Final = 512


class UnknownEncoding(ValueError):
    """A stored body in an encoding this version cannot read (a newer writer's)."""


def pack(body: bytes) -> tuple[bytes, str | None]:
    """``(stored bytes, encoding)`` for a raw body."""
    if len(body) < MIN_COMPRESS:
        return body, None
    packed: bytes = lz4.frame.compress(body, store_size=True)
    if len(packed) >= len(body):
        return body, None
    return packed, LZ4


def unpack(stored: bytes, encoding: str | None) -> bytes:
    """The raw body back from what :func:`pack` stored."""
    if encoding is None:
        return bytes(stored)
    if encoding == LZ4:
        raw: bytes = lz4.frame.decompress(bytes(stored))
        return raw
    raise UnknownEncoding(f"unknown webhook body encoding {encoding!r}")
