"""The compiled init kernel gives the NumPy reference's bits, never contracts into FMA, and falls back."""

import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dropfleet.common.model.layout import model_layout
from dropfleet.common.model.registry import MODELS
from dropfleet.common.seed import init_compiled
from dropfleet.common.seed.init_scheme import InitSpec, initial_range, initial_values

pytestmark = pytest.mark.skipif(init_compiled.kernel() is None, reason="numba is not installed")

SPECS = [
    InitSpec("uniform", 0.05),
    InitSpec("normal", 0.7),
    InitSpec("uniform", 1e-30),
    InitSpec("normal", 3.0),
]
SEEDS = [0, 1, 2**32 - 1, 2**32, 123_456_789_012_345, 2**64 - 1]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype == np.float32 and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def both(seed, name, spec, idx):
    return (
        initial_values(seed, name, spec, idx, backend="numpy"),
        initial_values(seed, name, spec, idx, backend="compiled"),
    )


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-{s.param}")
@pytest.mark.parametrize("seed", SEEDS)
def test_ranges_random_sets_and_indices_past_2_32_match(seed, spec):
    rng = np.random.default_rng(seed % 2**32)
    for idx in (
        np.arange(50_000, dtype=np.uint64),
        rng.integers(0, 2**63, 20_000, dtype=np.uint64),  # unsorted, sparse
        np.arange(2**32 - 3000, 2**32 + 3000, dtype=np.uint64),
        np.arange(2**40, 2**40 + 2000, dtype=np.int64),
    ):
        assert same_bits(*both(seed, "fc1.weight", spec, idx))


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_every_tensor_of_every_model_matches(model_id):
    for t in model_layout(model_id).tensors:
        if t.init.kind != "constant":
            assert same_bits(*both(7, t.name, t.init, np.arange(t.numel))), t.name


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**64 - 1),
    kind=st.sampled_from(["uniform", "normal"]),
    param=st.floats(0, 100, allow_nan=False),
    idx=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=64),
)
def test_any_seed_index_and_scale_match(seed, kind, param, idx):
    assert same_bits(*both(seed, "t", InitSpec(kind, param), np.array(idx, dtype=np.uint64)))


def test_shapes_are_kept_and_empty_requests_work():
    idx = np.arange(12, dtype=np.uint64).reshape(3, 4)
    a, b = both(3, "w", InitSpec("normal", 1.0), idx)
    assert b.shape == (3, 4) and same_bits(a, b)
    assert (
        initial_values(3, "w", InitSpec("normal", 1.0), np.zeros(0, np.int64), backend="compiled").size == 0
    )


def test_the_compiled_code_has_no_fused_multiply_add():
    """An FMA rounds once where the reference rounds twice: fastmath must stay off."""
    source = Path(init_compiled.__file__)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import numba  # the cached kernel cannot be inspected: compile a fresh one

        fresh = numba.njit(cache=False, fastmath=False, nogil=True, error_model="numpy")(init_compiled._fill)
        fresh(np.empty(1, np.float32), np.zeros(1, np.uint64), *(np.uint64(0),) * 4, 1, 1.0)
        asm = "\n".join(fresh.inspect_asm().values())
    assert "mulsd" in asm or "fmul" in asm or "mulpd" in asm, "not the kernel's assembly"
    fused = re.findall(r"\b(v?f(?:n)?m(?:add|sub)\w*|fml[as]\w*)\b", asm, re.IGNORECASE)
    assert fused == [], f"{source.name} compiled into FMA instructions: {sorted(set(fused))[:5]}"


def _run(code: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_numba_disabled_falls_back_to_the_reference_with_a_log_line():
    code = (
        "import logging, numpy as np; logging.basicConfig(level=logging.INFO)\n"
        "from dropfleet.common.seed import init_compiled\n"
        "from dropfleet.common.seed.init_scheme import InitSpec, initial_values\n"
        "assert init_compiled.kernel() is None\n"
        "v = initial_values(0, '1.weight', InitSpec('normal', 1.0), np.array([0, 1, 12345, 2**40]))\n"
        "print([float(x).hex() for x in v])\n"
    )
    done = _run(code, {"NUMBA_DISABLE_JIT": "1"})
    assert done.returncode == 0, done.stderr
    assert "NUMBA_DISABLE_JIT is set" in done.stderr
    want = initial_values(0, "1.weight", InitSpec("normal", 1.0), np.array([0, 1, 12345, 2**40]))
    assert done.stdout.strip() == str([float(x).hex() for x in want])


def test_without_a_writable_cache_directory_it_compiles_per_process(tmp_path):
    """A read-only install: no __pycache__ can be made beside the module, no user cache dir."""
    shutil.copy(init_compiled.__file__, tmp_path / "init_compiled.py")
    (tmp_path / "__pycache__").write_text("")  # a file where numba would make its cache directory
    env = {"HOME": "/proc/none", "XDG_CACHE_HOME": "/proc/none", "NUMBA_CACHE_DIR": ""}
    code = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "import init_compiled; assert init_compiled.kernel() is not None\n"
    )
    done = _run(code, env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "no writable cache directory" in done.stderr


@pytest.mark.parametrize("backend", ["numpy", "auto"])
@pytest.mark.parametrize(
    "spec", [InitSpec("normal", 0.05), InitSpec("uniform", 0.1), InitSpec("constant", 0.25)]
)
def test_ranges_written_in_place_are_the_same_bits(backend, spec):
    """What streaming regenerates a block with: chunk boundaries and offsets past 2**32 included."""
    for start, n in ((0, 1), (5, 4097), (2**32 - 3, 20_000), (123_456, 16_385)):
        out = np.full(n, np.nan, np.float32)
        initial_range(2**64 - 1, "0.weight", spec, start, out, backend=backend)
        want = initial_values(2**64 - 1, "0.weight", spec, np.arange(start, start + n, dtype=np.uint64))
        assert same_bits(out, want), (backend, spec, start, n)
