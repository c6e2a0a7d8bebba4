"""Test data: random sparse models of the 90k MLP (real shapes, real tensors)."""

import numpy as np

from dropfleet.common.model.layout import model_layout
from dropfleet.common.model.sparse import SparseModel, sparse_from_dense_delta

N_MLP = 89_610


def random_sparse_model(k: int, seed: int = 0, model_seed: int = 0, scale: float = 0.01) -> SparseModel:
    """`k` tracked entries at random positions of mlp-90k with normal(0, scale) deltas."""
    rng = np.random.default_rng(seed)
    flat = np.zeros(N_MLP, np.float32)
    flat[rng.choice(N_MLP, k, replace=False)] = (rng.standard_normal(k) * scale).astype(np.float32)
    deltas, start = {}, 0
    for name, shape in model_layout("mlp-90k").shapes.items():
        size = int(np.prod(shape))
        deltas[name] = flat[start : start + size].reshape(shape)
        start += size
    return sparse_from_dense_delta("mlp-90k", model_seed, deltas)
