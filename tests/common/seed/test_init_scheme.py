"""Seeded init scheme v1: golden values, slices, an independent scalar reimplementation."""

import hashlib
import math
import struct

import numpy as np
import pytest

from dropfleet.common.errors import InitSchemeError
from dropfleet.common.model.layout import model_layout
from dropfleet.common.model.torch_model import seeded_model
from dropfleet.common.seed.init_scheme import InitSpec, initial_tensor, initial_values, tensor_id

IDX = np.array([0, 1, 12345, 2**40])
GOLDEN = {
    (0, "uniform"): [
        "-0x1.2265a00000000p-6",
        "0x1.3f7c860000000p-10",
        "0x1.9793d80000000p-5",
        "0x1.848d040000000p-5",
    ],
    (0, "normal"): [
        "-0x1.0797800000000p-3",
        "0x1.147e7e0000000p-4",
        "-0x1.aa5fd20000000p-8",
        "-0x1.fd3ffa0000000p-7",
    ],
    (42, "uniform"): [
        "0x1.30e6620000000p-8",
        "-0x1.1627160000000p-8",
        "-0x1.68a3de0000000p-5",
        "0x1.74fd9c0000000p-5",
    ],
    (42, "normal"): [
        "-0x1.be1d620000000p-4",
        "-0x1.6958d20000000p-5",
        "0x1.dd22540000000p-3",
        "0x1.ebadea0000000p-6",
    ],
    (2**64 - 1, "uniform"): [
        "-0x1.cf2ec20000000p-6",
        "-0x1.82a5e80000000p-6",
        "0x1.b918180000000p-7",
        "-0x1.68da8a0000000p-6",
    ],
    (2**64 - 1, "normal"): [
        "0x1.0d62bc0000000p-3",
        "0x1.1163540000000p-3",
        "0x1.dbd7060000000p-6",
        "-0x1.e4bef40000000p-8",
    ],
}
SPECS = {"uniform": InitSpec("uniform", 0.05), "normal": InitSpec("normal", 0.1)}
MODEL_HASHES = {
    "mlp-90k": "e64e778f7c2a4687a9cfee7bec217ebc69150f8b7b0a128d5bbb9dbe231c3941",
    "cnn-bn-prelu": "9d63ccaf4daf33c84cf2af803201366889c133bfe0c33973989c4b8336b8f805",
    "lenet-300-100": "fcfafffc7a09ccc0bd21513485486518aa5adf188eab2ccd71055cf3614e342a",
}


@pytest.mark.parametrize("backend", ["numpy", "auto"])
@pytest.mark.parametrize(("seed", "kind"), list(GOLDEN))
def test_golden_values(seed, kind, backend):
    got = initial_values(seed, "1.weight", SPECS[kind], IDX, backend=backend)
    assert [float(v).hex() for v in got] == GOLDEN[(seed, kind)]


@pytest.mark.parametrize("model_id", list(MODEL_HASHES))
def test_golden_whole_model_hash(model_id):
    h = hashlib.sha256()
    for _, p in seeded_model(model_id, 7).named_parameters():
        h.update(p.detach().numpy().tobytes())
    assert h.hexdigest() == MODEL_HASHES[model_id]


def test_tensor_id_is_sha256_prefix():
    assert tensor_id("0.weight") == 0xC7C2CADAE2E5685F


@pytest.mark.parametrize("kind", ["uniform", "normal"])
def test_any_slice_equals_the_same_slice_of_the_whole(kind):
    whole = initial_tensor(5, "fc.weight", SPECS[kind], (300, 70)).reshape(-1)
    rng = np.random.default_rng(1)
    picks = np.sort(rng.choice(whole.size, 500, replace=False))
    assert np.array_equal(initial_values(5, "fc.weight", SPECS[kind], picks), whole[picks])
    assert np.array_equal(initial_values(5, "fc.weight", SPECS[kind], np.arange(100, 200)), whole[100:200])


def test_seed_and_name_change_values():
    a = initial_tensor(1, "a", SPECS["uniform"], (1000,))
    assert not np.array_equal(a, initial_tensor(2, "a", SPECS["uniform"], (1000,)))
    assert not np.array_equal(a, initial_tensor(1, "b", SPECS["uniform"], (1000,)))


def test_distributions_are_the_scaled_inits():
    u = initial_tensor(3, "u", InitSpec("uniform", 0.5), (200_000,)).astype(np.float64)
    assert u.min() >= -0.5 and u.max() <= 0.5
    assert abs(u.mean()) < 0.005 and abs(u.var() - 0.25 / 3) < 0.002
    n = initial_tensor(3, "n", InitSpec("normal", 2.0), (200_000,)).astype(np.float64)
    assert abs(n.mean()) < 0.02 and abs(n.std() - 2.0) < 0.02
    assert abs((np.abs(n) > 2 * 1.96).mean() - 0.05) < 0.003  # Gaussian tails


def test_layer_rules_cover_batch_norm_and_prelu():
    specs = {t.name: t.init for t in model_layout("cnn-bn-prelu").tensors}
    assert specs["1.weight"] == InitSpec("constant", 1.0)
    assert specs["1.bias"] == InitSpec("constant", 0.0)
    assert specs["2.weight"] == InitSpec("constant", 0.25)
    assert specs["0.weight"] == InitSpec("normal", math.sqrt(2.0 / 9))
    m = seeded_model("cnn-bn-prelu", 0)
    assert bool((m[2].weight == 0.25).all()) and bool((m[1].weight == 1.0).all())
    mlp = {t.name: t.init for t in model_layout("mlp-90k").tensors}
    assert mlp["1.weight"] == InitSpec("uniform", 1 / math.sqrt(784))


@pytest.mark.parametrize(
    ("seed", "kwargs"),
    [(-1, {}), (2**64, {}), (1.5, {}), (0, {"scheme": 2})],
)
def test_bad_requests_raise(seed, kwargs):
    with pytest.raises(InitSchemeError):
        initial_values(seed, "w", SPECS["uniform"], np.arange(3), **kwargs)


def test_bad_spec_raises():
    with pytest.raises(InitSchemeError):
        InitSpec("xavier", 1.0)  # type: ignore[arg-type]
    with pytest.raises(InitSchemeError):
        InitSpec("normal", float("nan"))


# --- an independent scalar reimplementation of docs/init-scheme.md -----------------------


def _philox_scalar(ctr, key):
    m0, m1, w0, w1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + w0) & 0xFFFFFFFF, (k1 + w1) & 0xFFFFFFFF
        p0, p1 = m0 * c0, m1 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c3 ^ k1, p0 & 0xFFFFFFFF
    return c0, c1, c2, c3


def _horner(coeffs, x):
    acc = coeffs[-1]
    for c in reversed(coeffs[:-1]):
        acc = acc * x + c
    return acc


def _scalar_value(seed, name, spec, i):
    t = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    x = _philox_scalar((i & 0xFFFFFFFF, i >> 32, t & 0xFFFFFFFF, t >> 32), (seed & 0xFFFFFFFF, seed >> 32))
    u1 = (((x[0] >> 6) << 26 | (x[1] >> 6)) + 0.5) * 2.0**-52
    u2 = (((x[2] >> 6) << 26 | (x[3] >> 6)) + 0.5) * 2.0**-52
    if spec.kind == "uniform":
        v = spec.param * (2.0 * u1 - 1.0)
    else:
        m, e = math.frexp(u1)
        if m < math.sqrt(0.5):
            m, e = m * 2.0, e - 1
        s = (m - 1.0) / (m + 1.0)
        ln = e * 0.6931471805599453 + s * _horner([2.0 / (2 * j + 1) for j in range(14)], s * s)
        q4 = u2 * 4.0
        q = math.floor(q4)
        a = (q4 - q) * 1.5707963267948966
        cos_a = _horner([(-1.0) ** j / math.factorial(2 * j) for j in range(13)], a * a)
        sin_a = a * _horner([(-1.0) ** j / math.factorial(2 * j + 1) for j in range(13)], a * a)
        c = (cos_a, -sin_a, -cos_a, sin_a)[int(q)]
        v = spec.param * (math.sqrt(-2.0 * ln) * c)
    return struct.unpack("<f", struct.pack("<f", v))[0]  # round to binary32


@pytest.mark.parametrize("kind", ["uniform", "normal"])
def test_scalar_reimplementation_matches_bit_for_bit(kind):
    idx = [0, 1, 2, 99, 4096, 2**33 + 5]
    got = initial_values(2**63 + 11, "layer.weight", SPECS[kind], np.array(idx))
    want = [_scalar_value(2**63 + 11, "layer.weight", SPECS[kind], i) for i in idx]
    assert [float(v).hex() for v in got] == [v.hex() for v in want]
