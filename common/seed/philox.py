"""Philox4x32-10, the counter-based generator of Salmon et al. (SC'11).

Pure unsigned-integer arithmetic in NumPy, so every platform (x86 servers,
ARM boards) and every thread count produces the same bits, and any counter can
be evaluated alone: value i never depends on values 0..i-1.
"""

import numpy as np

_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = 0x9E3779B9
_W1 = 0xBB67AE85
_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
ROUNDS = 10


def philox4x32(
    counter: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    key: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return the four 32-bit output words for each 128-bit counter.

    `counter` holds four equally shaped arrays (words 0..3, any integer dtype,
    values < 2**32); `key` two 32-bit words. Outputs are uint64 arrays whose
    values are < 2**32 (uint64 keeps the 32x32->64 products exact).
    """
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF
    for r in range(ROUNDS):
        if r:
            k0 = (k0 + _W0) & 0xFFFFFFFF
            k1 = (k1 + _W1) & 0xFFFFFFFF
        p0 = _M0 * c0
        p1 = _M1 * c2
        c0, c1, c2, c3 = (
            (p1 >> _SHIFT32) ^ c1 ^ np.uint64(k0),
            p1 & _MASK32,
            (p0 >> _SHIFT32) ^ c3 ^ np.uint64(k1),
            p0 & _MASK32,
        )
    return c0, c1, c2, c3
