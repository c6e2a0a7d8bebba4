"""Each trainer's stated step footprint against the peak measured in real steps on real data."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.profiler import profile

from dropfleet.common.device import running_topk
from dropfleet.common.device.budget import DEFAULT_BLOCK_WEIGHTS, Footprint, activation_bytes
from dropfleet.common.device.data import load_fashion_mnist
from dropfleet.common.device.dropback import DropBack
from dropfleet.common.device.footprint import can_measure, held_bytes, measure_step_peak
from dropfleet.common.device.streaming import StreamingDropBack
from dropfleet.common.device.train import PeakProbe
from dropfleet.common.model.layout import model_layout
from dropfleet.common.model.sparse import SparseModel, SparseTensor, initial_at_tracked
from dropfleet.common.model.torch_model import load_deltas_, seeded_model
from dropfleet.common.seed import init_compiled

# A stated footprint may be loose (it must hold for any batch), but not absurdly.
LOOSENESS = 1.6


@pytest.fixture(scope="module")
def batches():
    init_compiled.kernel()  # compiling the kernels is a one-time cost of the process, not of a step
    running_topk.kernel()
    data = load_fashion_mnist("train", indices=np.arange(256))
    return data.images, data.labels


def _global_set(model_id: str, k: int) -> SparseModel:
    """A published set of k random positions: the device's first step scores all weights against 0."""
    rng = np.random.default_rng(k)
    layout = model_layout(model_id)
    positions = np.sort(rng.choice(layout.numel, k, replace=False))
    tensors = tuple(
        SparseTensor(t.name, t.shape, local, (rng.standard_normal(local.size) * 0.01).astype(np.float32))
        for t, local in zip(layout.tensors, layout.split(positions), strict=True)
    )
    return SparseModel(seed=0, model_id=model_id, tensors=tensors)


def _measured_and_stated(model_id, trainer, batch, k, batches, backend="auto"):
    start = _global_set(model_id, k)
    act = activation_bytes(model_id, batch)
    if trainer == "dense":
        model = seeded_model(model_id, 0)
        load_deltas_(model, start)
        opt = DropBack(model.parameters(), lr=0.1, k=k)
        opt.set_tracked(initial_at_tracked(start))
        holders = (model, opt)
        stated = DropBack.footprint(model_layout(model_id), act)
    else:
        block = {"streaming-blocks": DEFAULT_BLOCK_WEIGHTS, "streaming-blocks-2048": 2048}.get(trainer)
        model = opt = StreamingDropBack(model_id, 0, k, 0.1, block_weights=block, backend=backend)
        opt.load(start)
        holders = (opt,)
        stated = opt.footprint(act)
    images, labels = batches
    peaks = []
    for s in range(2):  # the round's first step (bar at zero) and a steady one
        x, y = images[s * batch : (s + 1) * batch], labels[s * batch : (s + 1) * batch]
        opt.zero_grad()
        at_start = held_bytes(*holders)

        def step(x=x, y=y):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        peaks.append(at_start + measure_step_peak(step))
    return max(peaks), stated.bytes(k)


@pytest.mark.parametrize(
    ("model_id", "trainer", "batch", "fraction", "backend"),
    [
        ("mlp-90k", "dense", 32, 20, "auto"),
        ("mlp-90k", "dense", 8, 5, "auto"),
        ("mlp-90k", "streaming", 32, 20, "auto"),
        ("mlp-90k", "streaming", 128, 5, "numpy"),
        ("mlp-90k", "streaming-blocks", 32, 20, "auto"),
        ("mlp-90k", "streaming-blocks-2048", 8, 100, "numpy"),
        ("mlp-90k", "streaming-blocks-2048", 32, 20, "auto"),
        ("lenet-300-100", "streaming-blocks", 32, 5, "auto"),
        ("cnn-bn-prelu", "dense", 8, 20, "auto"),
        ("cnn-bn-prelu", "streaming", 8, 5, "auto"),
    ],
)
def test_the_stated_footprint_covers_the_measured_step_peak(
    model_id, trainer, batch, fraction, backend, batches
):
    k = model_layout(model_id).numel // fraction
    measured, stated = _measured_and_stated(model_id, trainer, batch, k, batches, backend)
    assert measured <= stated, f"{trainer} stated {stated} B, measured {measured} B"
    assert stated <= LOOSENESS * measured, f"{trainer} stated {stated} B for a {measured} B peak"


def test_footprint_max_k_is_the_largest_fitting_k():
    fp = Footprint(fixed_bytes=1000, bytes_per_tracked=7)
    for budget in (999, 1000, 1006, 1007, 50_000):
        k = fp.max_k(budget)
        assert fp.bytes(k) <= budget or k == 0
        assert fp.bytes(k + 1) > budget


def test_streaming_states_less_than_dense_and_blocks_least():
    act = activation_bytes("mlp-90k", 32)
    dense = DropBack.footprint(model_layout("mlp-90k"), act)
    layers = StreamingDropBack("mlp-90k", 0, 1, 0.1).footprint(act)
    blocks = StreamingDropBack("mlp-90k", 0, 1, 0.1, block_weights=DEFAULT_BLOCK_WEIGHTS).footprint(act)
    assert blocks.fixed_bytes < layers.fixed_bytes < dense.fixed_bytes


def test_activations_grow_with_the_batch_and_the_cnn_dominates():
    assert activation_bytes("mlp-90k", 64) == 2 * activation_bytes("mlp-90k", 32)
    assert activation_bytes("cnn-bn-prelu", 32) > 50 * activation_bytes("mlp-90k", 32)


def test_measured_peak_sees_torch_and_numpy_allocations():
    def step():
        a = torch.ones(250_000)  # 1 MB in torch's allocator
        b = np.ones(250_000, np.float32)  # 1 MB through numpy (tracemalloc)
        return float(a.sum()) + float(b.sum())

    assert 2_000_000 <= measure_step_peak(step) < 2_200_000
    assert measure_step_peak(lambda: None) < 50_000


def test_no_measurement_inside_another_profiler():
    assert can_measure()
    with profile():
        assert not can_measure()


def test_held_bytes_counts_a_storage_once():
    t = torch.zeros(1000)
    view = t[:10]
    arr = t.numpy()
    assert held_bytes(t, view, arr, [t], {"x": view}) == 4000
    model = seeded_model("mlp-90k", 0)
    assert held_bytes(model) == 4 * model_layout("mlp-90k").numel


def test_a_probe_with_a_key_measures_once_per_process_and_reuses_the_peak():
    calls = []

    def held():
        calls.append(1)
        return 1000

    def step():
        return torch.ones(250_000).sum()

    first = PeakProbe(held, key=("test-probe", 1))
    first.measure(step)
    assert first.peak_bytes is not None and first.peak_bytes >= 1_000_000 + 1000
    again = PeakProbe(held, key=("test-probe", 1))
    with profile():  # the profiler busy: a fresh measurement could not run, the known peak is reused
        again.measure(step)
    assert again.peak_bytes == first.peak_bytes and len(calls) == 1
    other = PeakProbe(held, key=("test-probe", 2))
    other.measure(step)
    assert other.peak_bytes is not None and len(calls) == 2


def test_measuring_keeps_the_profilers_native_log_off_stderr():
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    code = (
        "import torch; from dropfleet.common.device.footprint import measure_step_peak; "
        "print(measure_step_peak(lambda: torch.ones(1000)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and int(done.stdout) >= 4000, done.stderr
    assert "USDT" not in done.stderr and "profiler_start" not in done.stderr, done.stderr
