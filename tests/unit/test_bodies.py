"""How raw webhook bodies are stored (app/store/bodies.py)."""

from __future__ import annotations

import json
import os

import lz4.frame
import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.store.bodies import LZ4, MIN_COMPRESS, UnknownEncoding, pack, unpack

DELIVERY = json.dumps(
    {
        "action": "created",
        "comment": {"body": "/cast com.example.hello name=world"},
        "repository": {
            f"{k}{i}_url": f"https://api.github.com/repos/octo/hello/{k}/{i}"
            for k in "abcdefghij"
            for i in range(20)
        },
    }
).encode()


def test_a_delivery_is_stored_as_a_standard_lz4_frame_a_fraction_of_its_size() -> None:
    stored, encoding = pack(DELIVERY)
    assert encoding == LZ4
    assert len(stored) < len(DELIVERY) // 3
    assert lz4.frame.decompress(stored) == DELIVERY  # any lz4 reader (`lz4 -d`) reads it
    assert unpack(stored, encoding) == DELIVERY


def test_small_and_incompressible_bodies_are_stored_raw() -> None:
    small = b'{"zen": "Keep it logically awesome."}'
    assert len(small) < MIN_COMPRESS
    assert pack(small) == (small, None)
    noise = os.urandom(4096)
    assert pack(noise) == (noise, None)
    assert unpack(noise, None) == noise
    assert unpack(memoryview(noise), None) == noise  # drivers may hand back buffers


def test_an_unknown_encoding_is_refused_not_misread() -> None:
    with pytest.raises(UnknownEncoding, match="zstd"):
        unpack(b"...", "zstd")


@given(st.binary(max_size=5000) | st.text(max_size=3000).map(lambda t: (t * 3).encode()))
def test_any_body_round_trips(body: bytes) -> None:
    stored, encoding = pack(body)
    assert unpack(stored, encoding) == body
    assert len(stored) <= len(body)
