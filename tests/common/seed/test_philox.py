"""Philox4x32-10 against the Random123 known-answer vectors."""

import numpy as np
import pytest

from dropfleet.common.seed.philox import philox4x32

KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize(("counter", "key", "expected"), KAT)
def test_known_answers(counter, key, expected):
    out = philox4x32(tuple(np.array([c], dtype=np.uint64) for c in counter), key)
    assert tuple(int(o[0]) for o in out) == expected


def test_vectorized_equals_one_at_a_time():
    c = np.arange(1000, dtype=np.uint64)
    z = np.zeros_like(c)
    batch = philox4x32((c, z, z + 7, z), (1, 2))
    for i in (0, 1, 517, 999):
        single = philox4x32(tuple(np.array([v], dtype=np.uint64) for v in (i, 0, 7, 0)), (1, 2))
        assert [int(w[i]) for w in batch] == [int(w[0]) for w in single]
