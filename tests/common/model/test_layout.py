"""The model layout: the one conversion between (tensor, local index) and global flat index."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dropfleet.common.model.layout import Layout, model_layout
from dropfleet.common.model.registry import MODELS
from dropfleet.common.model.torch_model import build_model


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_registered_layout_follows_parameter_order_with_an_init_spec_each(model_id: str) -> None:
    layout = model_layout(model_id)
    params = list(build_model(model_id).named_parameters())
    assert [t.name for t in layout.tensors] == [n for n, _ in params]
    assert [t.shape for t in layout.tensors] == [tuple(p.shape) for _, p in params]
    assert layout.numel == sum(p.numel() for _, p in params)
    assert all(t.init is not None for t in layout.tensors)
    assert list(layout.offsets) == [0, *np.cumsum([p.numel() for _, p in params])]


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 50), min_size=1, max_size=6),
    data=st.data(),
)
def test_split_and_join_are_inverse(sizes: list[int], data: st.DataObject) -> None:
    layout = Layout.of_shapes((f"t{i}", (n,)) for i, n in enumerate(sizes))
    positions = np.array(
        sorted(data.draw(st.sets(st.integers(0, max(layout.numel - 1, 0)))) if layout.numel else []),
        dtype=np.int64,
    )
    local = layout.split(positions)
    assert all(((i >= 0) & (i < t.numel)).all() for i, t in zip(local, layout.tensors, strict=True))
    assert np.array_equal(layout.join(local), positions)


def test_join_refuses_the_wrong_number_of_tensors() -> None:
    with pytest.raises(ValueError, match="expected 2"):
        Layout.of_shapes([("a", (2,)), ("b", (3,))]).join([np.zeros(0, np.int64)])
