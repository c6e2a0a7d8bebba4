"""The streaming step's running top-k: one total rule, the same bits from the reference and the kernel."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dropfleet.common.device import running_topk
from dropfleet.common.device.running_topk import CompiledTopK, RunningTopK
from dropfleet.common.device.streaming import StreamingDropBack
from dropfleet.common.device.train import train_epochs
from tests.factories import random_sparse_model

pytestmark = pytest.mark.skipif(running_topk.kernel() is None, reason="numba is not installed")


def _blocks(draw_ints, sizes):
    """Blocks of coarse values (many equal scores) with some tracked entries each."""
    rng = np.random.default_rng(draw_ints)
    for n in sizes:
        step = (rng.integers(-3, 4, n) * 0.25).astype(np.float32)
        w0 = (rng.integers(-3, 4, n) * 0.5).astype(np.float32)
        local = np.sort(rng.choice(n, int(rng.integers(0, n + 1)), replace=False)).astype(np.int64)
        moved = (w0[local] + rng.integers(-3, 4, local.size) * 0.25).astype(np.float32)
        yield step, w0, local, moved


def _brute_force(blocks, k):
    """Every offered weight ranked by (score descending, offer order), the first k kept."""
    index, value, score = [], [], []
    base = 0
    for step, w0, local, moved in blocks:
        new, s = w0 + step, np.abs(step)
        new[local], s[local] = moved, np.abs(moved - w0[local])
        index.append(base + np.arange(step.size))
        value.append(new)
        score.append(s)
        base += step.size
    index, value, score = np.concatenate(index), np.concatenate(value), np.concatenate(score)
    keep = np.lexsort((np.arange(score.size), -score))[:k]
    order = np.argsort(index[keep])
    return index[keep][order], value[keep][order]


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    k=st.integers(1, 60),
    sizes=st.lists(st.integers(1, 150), min_size=1, max_size=6),
)
def test_reference_kernel_and_brute_force_agree_on_ties(seed, k, sizes):
    blocks = list(_blocks(seed, sizes))
    reference, compiled = RunningTopK(k), running_topk.make(k)
    assert isinstance(compiled, CompiledTopK)
    base = 0
    for step, w0, local, moved in blocks:
        reference.offer(base, step, w0, local, moved)
        compiled.offer(base, step, w0, local, moved)
        base += step.size
    want = _brute_force(blocks, k)
    for got in (reference.result(), compiled.result()):
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_numpy_backend_selects_with_the_reference():
    assert isinstance(running_topk.make(5, backend="numpy"), RunningTopK)


@pytest.mark.parametrize("block", [None, 2048])
def test_compiled_streaming_is_bit_identical_to_the_numpy_reference(block, fmnist_train):
    """Regeneration and selection both compiled against both in NumPy: the same model, bit for bit."""
    data = fmnist_train.subset(np.arange(640))  # 20 steps, constant pixels: ties at the k-th place
    start = random_sparse_model(3000, seed=8)
    models = []
    for backend in ("numpy", "auto"):
        trainer = StreamingDropBack("mlp-90k", 0, 4480, 0.1, block_weights=block, backend=backend)
        trainer.load(start)
        train_epochs(trainer, trainer, data, 1, 32, seed=3)
        models.append(trainer.to_sparse())
    for a, b in zip(models[0].tensors, models[1].tensors, strict=True):
        assert np.array_equal(a.indices, b.indices) and np.array_equal(a.values, b.values), a.name
