"""Seeded initial weights, scheme version 1: w0 = f(seed, tensor name, index).

DropBack never stores initial weights: every party regenerates them from the
model's seed. Scheme v1 (written down in docs/init-scheme.md precisely enough
to reimplement) is:

1. key = (seed & 0xFFFFFFFF, seed >> 32) for a 64-bit seed.
2. tensor id t = the first 8 bytes, little-endian, of SHA-256(name as UTF-8).
3. For flat (row-major) element index i, the Philox4x32-10 counter is
   (i & 0xFFFFFFFF, i >> 32, t & 0xFFFFFFFF, t >> 32); it yields words x0..x3.
4. Two uniforms in (0, 1), exact in binary64:
   u1 = (((x0 >> 6) << 26 | (x1 >> 6)) + 0.5) * 2**-52, and u2 likewise
   from (x2, x3).
5. By the tensor's `InitSpec`:
   uniform(b):  float32(b * (2 * u1 - 1))
   normal(s):   float32(s * sqrt(-2 ln u1) * cos(2 pi u2)), with ln and cos
                evaluated by the fixed polynomials below (IEEE +, -, *, /,
                sqrt only, so no platform libm is involved)
   constant(c): float32(c)

Because each element depends only on its own counter, any slice can be
regenerated alone and equals the same slice of the whole tensor.
"""

import hashlib
import math
from dataclasses import dataclass
from functools import cache
from typing import Literal

import numpy as np

from dropfleet.common.errors import InitSchemeError
from dropfleet.common.seed import init_compiled
from dropfleet.common.seed.philox import philox4x32

INIT_SCHEME_VERSION = 1
SUPPORTED_INIT_SCHEMES = frozenset({INIT_SCHEME_VERSION})

InitKind = Literal["uniform", "normal", "constant"]
Backend = Literal["auto", "numpy", "compiled"]
BACKENDS = ("auto", "numpy", "compiled")


@dataclass(frozen=True)
class InitSpec:
    """How one tensor is initialized: `param` is the bound, std or constant."""

    kind: InitKind
    param: float

    def __post_init__(self) -> None:
        if self.kind not in ("uniform", "normal", "constant"):
            raise InitSchemeError(f"unknown init kind {self.kind!r}")
        if not math.isfinite(self.param):
            raise InitSchemeError(f"init parameter must be finite, got {self.param!r}")
        if self.kind != "constant" and self.param < 0:
            raise InitSchemeError(f"{self.kind} init needs param >= 0, got {self.param!r}")


@cache
def tensor_id(name: str) -> int:
    """The 64-bit id of a tensor name (step 2 of the scheme)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


_TWO_POW_M52 = 2.0**-52
_SQRT_HALF = math.sqrt(0.5)
_LN2 = 0.6931471805599453
# 2 / (2j + 1): series ln(m) = sum_j 2 s^(2j+1) / (2j+1), s = (m - 1) / (m + 1).
_LN_COEFFS = tuple(2.0 / (2 * j + 1) for j in range(14))
_HALF_PI = 1.5707963267948966
# Taylor coefficients of cos and sin on [0, pi/2).
_COS_COEFFS = tuple((-1.0) ** j / math.factorial(2 * j) for j in range(13))
_SIN_COEFFS = tuple((-1.0) ** j / math.factorial(2 * j + 1) for j in range(13))


def _horner(coeffs: tuple[float, ...], x: np.ndarray) -> np.ndarray:
    acc = np.full_like(x, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = acc * x
        acc = acc + c
    return acc


def _ln(u: np.ndarray) -> np.ndarray:
    """Natural log of u in (0, 1] from IEEE basic operations only."""
    m, e = np.frexp(u)
    small = m < _SQRT_HALF
    m = np.where(small, m * 2.0, m)
    e = np.where(small, e - 1, e).astype(np.float64)
    s = (m - 1.0) / (m + 1.0)
    return e * _LN2 + s * _horner(_LN_COEFFS, s * s)


def _cos_two_pi(u: np.ndarray) -> np.ndarray:
    """cos(2 pi u) for u in [0, 1) from IEEE basic operations only."""
    t = u * 4.0
    quadrant = np.floor(t)
    a = (t - quadrant) * _HALF_PI
    a2 = a * a
    cos_a = _horner(_COS_COEFFS, a2)
    sin_a = a * _horner(_SIN_COEFFS, a2)
    q = quadrant.astype(np.int64)
    return np.select([q == 0, q == 1, q == 2], [cos_a, -sin_a, -cos_a], default=sin_a)


def _uniform_pair(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    bits = ((hi >> np.uint64(6)) << np.uint64(26)) | (lo >> np.uint64(6))
    return (bits.astype(np.float64) + 0.5) * _TWO_POW_M52


def _check_scheme(scheme: int) -> None:
    if scheme not in SUPPORTED_INIT_SCHEMES:
        raise InitSchemeError(
            f"init scheme version {scheme} is not supported (supported: {sorted(SUPPORTED_INIT_SCHEMES)})"
        )


def _check_seed(seed: int) -> None:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise InitSchemeError(f"seed must be an integer, got {type(seed).__name__}")
    if not 0 <= int(seed) < 2**64:
        raise InitSchemeError(f"seed must be in [0, 2**64), got {seed}")


def initial_values(
    seed: int,
    name: str,
    spec: InitSpec,
    indices: np.ndarray,
    scheme: int = INIT_SCHEME_VERSION,
    backend: Backend = "auto",
) -> np.ndarray:
    """Initial values (float32) of tensor `name` at the given flat indices.

    `backend`: "auto" uses the compiled kernel (`init_compiled`) when numba is
    there and the NumPy reference otherwise; both give the same bits.
    """
    _check_scheme(scheme)
    _check_seed(seed)
    idx = np.asarray(indices)
    if idx.size and (idx.dtype.kind not in "iu" or int(idx.min()) < 0):
        raise InitSchemeError("indices must be non-negative integers")
    if spec.kind == "constant":
        return np.full(idx.shape, spec.param, dtype=np.float32)
    seed = int(seed)
    t = tensor_id(name)
    i = idx.astype(np.uint64)
    if backend not in BACKENDS:
        raise InitSchemeError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "numpy" and init_compiled.kernel() is not None:
        out = np.empty(i.shape, np.float32)
        kind = init_compiled.KIND_UNIFORM if spec.kind == "uniform" else init_compiled.KIND_NORMAL
        init_compiled.fill(out.reshape(-1), np.ascontiguousarray(i).reshape(-1), seed, t, kind, spec.param)
        return out
    if backend == "compiled":
        raise InitSchemeError("the compiled backend needs numba (pip install dropfleet[fast])")
    x0, x1, x2, x3 = philox4x32(
        (
            i & np.uint64(0xFFFFFFFF),
            i >> np.uint64(32),
            np.full_like(i, t & 0xFFFFFFFF),
            np.full_like(i, t >> 32),
        ),
        (seed & 0xFFFFFFFF, seed >> 32),
    )
    u1 = _uniform_pair(x0, x1)
    if spec.kind == "uniform":
        return (spec.param * (2.0 * u1 - 1.0)).astype(np.float32)
    u2 = _uniform_pair(x2, x3)
    radius = np.sqrt(-2.0 * _ln(u1))
    return (spec.param * (radius * _cos_two_pi(u2))).astype(np.float32)


def initial_tensor(
    seed: int,
    name: str,
    spec: InitSpec,
    shape: tuple[int, ...],
    scheme: int = INIT_SCHEME_VERSION,
) -> np.ndarray:
    """The whole initial tensor of the given shape (float32, row-major)."""
    n = math.prod(shape)
    return initial_values(seed, name, spec, np.arange(n, dtype=np.uint64), scheme).reshape(shape)


# Ranges are generated this many values at a time: the NumPy reference makes ~100 B of
# temporaries per value, the compiled kernel only the 8-byte index.
RANGE_CHUNK = {"numpy": 4096, "compiled": 16384}


def initial_range(
    seed: int,
    name: str,
    spec: InitSpec,
    start: int,
    out: np.ndarray,
    scheme: int = INIT_SCHEME_VERSION,
    backend: Backend = "auto",
) -> None:
    """Write the initial values of tensor `name` at flat indices [start, start + out.size) into `out`.

    The same bits as `initial_values` over that range, with bounded temporaries
    (what streaming regenerates a layer or a block of rows with).
    """
    if spec.kind == "constant":
        out.fill(spec.param)
        return
    if backend != "numpy" and init_compiled.kernel() is not None:  # checked once, not per chunk
        _check_scheme(scheme)
        _check_seed(seed)
        if start < 0:
            raise InitSchemeError("indices must be non-negative integers")
        kind = init_compiled.KIND_UNIFORM if spec.kind == "uniform" else init_compiled.KIND_NORMAL
        t, chunk = tensor_id(name), RANGE_CHUNK["compiled"]
        for a in range(0, out.size, chunk):
            b = min(a + chunk, out.size)
            idx = np.arange(start + a, start + b, dtype=np.uint64)
            init_compiled.fill(out[a:b], idx, int(seed), t, kind, spec.param)
        return
    chunk = RANGE_CHUNK["numpy"]
    for a in range(0, out.size, chunk):
        b = min(a + chunk, out.size)
        idx = np.arange(start + a, start + b, dtype=np.uint64)
        out[a:b] = initial_values(seed, name, spec, idx, scheme, backend)
