"""DropBack: exact agreement with a naive reference, O(k) state, freezing, torch's optimizer shape."""

import numpy as np
import pytest
import torch
from torch import nn

from dropfleet.common.device.budget import DENSE_STATE_BYTES_PER_TRACKED, FIXED_STATE_BYTES
from dropfleet.common.device.dropback import DropBack
from dropfleet.common.device.dropback_core import dropback_select
from dropfleet.common.errors import ConfigError
from dropfleet.common.model.torch_model import seeded_model


class NaiveDropBack:
    """The authors' algorithm as written: stored w0, exact top-k of |w - w0| every step."""

    def __init__(self, params, lrs, k):
        self.params, self.lrs, self.k = list(params), lrs, k
        self.w0 = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def step(self):
        for p, lr in zip(self.params, self.lrs, strict=True):
            p.add_(p.grad, alpha=-lr)
        score = torch.cat([(p - w0).abs().reshape(-1) for p, w0 in zip(self.params, self.w0, strict=True)])
        keep = torch.zeros_like(score, dtype=torch.bool)
        keep[torch.topk(score, self.k).indices] = True
        start = 0
        for p, w0 in zip(self.params, self.w0, strict=True):
            m = keep[start : start + p.numel()].view_as(p)
            p.copy_(torch.where(m, p, w0))
            start += p.numel()


def _batches(n, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 1, 28, 28, generator=g), torch.randint(0, 10, (size,), generator=g))
        for _ in range(n)
    ]


def _train(model, opt, batches):
    loss_fn = nn.CrossEntropyLoss()
    for x, y in batches:
        for p in model.parameters():
            p.grad = None if not isinstance(opt, DropBack) else p.grad
        if isinstance(opt, DropBack):
            opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("model_id", ["mlp-90k", "cnn-bn-prelu"])
def test_each_step_keeps_the_exact_top_k(model_id):
    """Oracle per step: the kept set is the exact top-k of |w - w0| in float64,
    except for swaps among scores equal to the k-th up to float32 rounding."""
    k = 1500
    model = seeded_model(model_id, 4)
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    opt = DropBack(model.parameters(), lr=0.1, k=k)
    loss_fn = nn.CrossEntropyLoss()
    for x, y in _batches(25, seed=5):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        w_pre = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
        opt.step()
        score = ((w_pre - 0.1 * g) - w0).abs()
        kth = torch.topk(score, k).values[-1].item()
        oracle = score >= kth
        kept = torch.cat(
            [
                (p.detach().reshape(-1).double() != w0[i : i + p.numel()])
                for i, p in zip(_offsets(model), model.parameters(), strict=True)
            ]
        )
        assert int(kept.sum()) <= k
        differ = (oracle != kept) & (score > 0)
        assert torch.all((score[differ] - kth).abs() <= 1e-6 * kth + 1e-9), int(differ.sum())
    assert opt.num_tracked == k


def _moved(model, w0):
    return torch.cat([(p != q).reshape(-1) for p, q in zip(model.parameters(), w0, strict=True)])


def _offsets(model):
    out, start = [], 0
    for p in model.parameters():
        out.append(start)
        start += p.numel()
    return out


def test_mlp_trajectory_matches_naive_reference():
    model_id = "mlp-90k"
    k = 2000
    batches = _batches(25)
    ref_model, fast_model = seeded_model(model_id, 3), seeded_model(model_id, 3)
    ref = NaiveDropBack(ref_model.parameters(), [0.1] * len(list(ref_model.parameters())), k)
    fast = DropBack(fast_model.parameters(), lr=0.1, k=k)
    loss_fn = nn.CrossEntropyLoss()
    w0 = [p.detach().clone() for p in ref_model.parameters()]
    for x, y in batches:
        ref_model.zero_grad()
        loss_fn(ref_model(x), y).backward()
        ref.step()
        fast.zero_grad()
        loss_fn(fast_model(x), y).backward()
        fast.step()
        ref_mask = _moved(ref_model, w0)
        fast_mask = _moved(fast_model, w0)
        assert torch.equal(ref_mask, fast_mask)
        for a, b in zip(ref_model.parameters(), fast_model.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert fast.num_tracked == k


def test_untracked_weights_sit_exactly_at_init_and_count_is_k():
    model = seeded_model("mlp-90k", 1)
    w0 = [p.detach().clone() for p in model.parameters()]
    opt = DropBack(model.parameters(), lr=0.2, k=500)
    _train(model, opt, _batches(30))
    tracked = opt.tracked()
    moved = 0
    for p, q, (idx, delta) in zip(model.parameters(), w0, tracked, strict=True):
        mask = torch.zeros(p.numel(), dtype=torch.bool)
        mask[torch.from_numpy(idx)] = True
        assert torch.equal(p.detach().reshape(-1)[~mask], q.reshape(-1)[~mask])  # bit for bit
        np.testing.assert_array_equal(delta, (p.detach() - q).reshape(-1)[mask].numpy())
        moved += int((p != q).sum())
    assert opt.num_tracked == 500 and moved <= 500


class DecayingNaiveDropBack(NaiveDropBack):
    """The authors' later option as written: w0 is multiplied by `decay` after every step."""

    def __init__(self, params, lrs, k, decay):
        super().__init__(params, lrs, k)
        self.decay = decay

    @torch.no_grad()
    def step(self):
        super().step()
        score = torch.cat([(p - w0).abs().reshape(-1) for p, w0 in zip(self.params, self.w0, strict=True)])
        moved = score > 0
        start = 0
        for p, w0 in zip(self.params, self.w0, strict=True):
            m = moved[start : start + p.numel()].view_as(p)
            w0.mul_(self.decay)
            p.copy_(torch.where(m, p, w0))  # untracked weights follow the decayed w0
            start += p.numel()


def test_init_decay_fades_w0_like_the_authors_rule_and_refuses_export():
    model, ref_model = seeded_model("mlp-90k", 1), seeded_model("mlp-90k", 1)
    opt = DropBack(model.parameters(), lr=0.2, k=500, init_decay=0.9)
    ref = DecayingNaiveDropBack(ref_model.parameters(), [0.2] * 6, 500, 0.9)
    _train(model, opt, _batches(8))
    _train(ref_model, ref, _batches(8))
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert opt.num_tracked == 500
    with pytest.raises(ConfigError, match="no sparse state to export"):
        opt.tracked()


def test_batch_norm_and_prelu_are_pruned_and_regenerated():
    model = seeded_model("cnn-bn-prelu", 0)
    opt = DropBack(model.parameters(), lr=0.1, k=300)
    _train(model, opt, _batches(20))
    names = [n for n, _ in model.named_parameters()]
    per_name = {n: idx.size for n, (idx, _) in zip(names, opt.tracked(), strict=True)}
    bn_prelu = ["1.weight", "1.bias", "2.weight", "5.weight", "5.bias", "6.weight"]
    assert any(per_name[n] > 0 for n in bn_prelu)  # some are trained...
    assert any(per_name[n] < model.get_parameter(n).numel() for n in bn_prelu)  # ...some pruned
    assert bool(((model[2].weight == 0.25) | (model[2].weight != 0.25)).all())
    untracked_prelu = model[6].weight.numel() - per_name["6.weight"]
    assert int((model[6].weight == 0.25).sum()) >= untracked_prelu


def test_state_is_order_k_with_no_dense_copy():
    model = seeded_model("mlp-90k", 0)
    k = 700
    opt = DropBack(model.parameters(), lr=0.1, k=k)
    _train(model, opt, _batches(5))
    sd = opt.state_dict()
    total = 0
    for st in sd["state"].values():
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel()
    assert total == 2 * k  # positions + w0 there, nothing else
    assert opt.state_bytes() < DENSE_STATE_BYTES_PER_TRACKED * k + 100
    tensors = [v for st in sd["state"].values() for v in st.values() if torch.is_tensor(v)]
    assert all(v.numel() < 78400 for v in tensors)
    # The optimizer-wide counters ride in the first parameter's state as plain scalars.
    assert all(
        isinstance(v, (int, float, bool))
        for st in sd["state"].values()
        for v in st.values()
        if not torch.is_tensor(v)
    )


def test_state_dict_round_trip_continues_identically():
    batches = _batches(20)
    a_model = seeded_model("mlp-90k", 0)
    a = DropBack(a_model.parameters(), lr=0.1, k=800, freeze_after=15)
    _train(a_model, a, batches[:10])
    sd = a.state_dict()
    b_model = seeded_model("mlp-90k", 0)
    b_model.load_state_dict(a_model.state_dict())
    b = DropBack(b_model.parameters(), lr=0.1, k=800, freeze_after=15)
    b.load_state_dict(sd)
    _train(a_model, a, batches[10:])
    _train(b_model, b, batches[10:])
    for p, q in zip(a_model.parameters(), b_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert a.frozen and b.frozen


def test_freeze_keeps_the_tracked_set():
    model = seeded_model("mlp-90k", 0)
    opt = DropBack(model.parameters(), lr=0.1, k=400, freeze_after=5)
    _train(model, opt, _batches(5))
    before = [idx.copy() for idx, _ in opt.tracked()]
    snapshot = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, _batches(10, seed=9))
    assert opt.frozen
    for (idx, _), old_idx, p, old in zip(opt.tracked(), before, model.parameters(), snapshot, strict=True):
        assert np.array_equal(idx, old_idx)
        changed = torch.nonzero((p != old).reshape(-1)).squeeze(1).numpy()
        assert np.isin(changed, idx).all()
    assert sum(int((p != o).sum()) for p, o in zip(model.parameters(), snapshot, strict=True)) > 0


def test_param_groups_use_their_own_learning_rate():
    batches = _batches(8)
    ref_model, fast_model = seeded_model("mlp-90k", 2), seeded_model("mlp-90k", 2)
    params = list(fast_model.parameters())
    fast = DropBack([{"params": params[:2], "lr": 0.05}, {"params": params[2:]}], lr=0.3, k=1500)
    ref = NaiveDropBack(ref_model.parameters(), [0.05, 0.05, 0.3, 0.3, 0.3, 0.3], 1500)
    loss_fn = nn.CrossEntropyLoss()
    for x, y in batches:
        ref_model.zero_grad()
        loss_fn(ref_model(x), y).backward()
        ref.step()
        fast.zero_grad()
        loss_fn(fast_model(x), y).backward()
        fast.step()
    for a, b in zip(ref_model.parameters(), fast_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_step_returns_closure_loss_and_works_after_set_to_none():
    model = seeded_model("mlp-90k", 0)
    opt = DropBack(model.parameters(), lr=0.1, k=100)
    x, y = _batches(1)[0]

    def closure():
        model.zero_grad(set_to_none=True)  # autograd then allocates fresh grads
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.item() > 0
    assert opt.num_tracked == 100


def test_set_tracked_trims_to_k_and_resets_the_rest():
    model = seeded_model("mlp-90k", 0)
    w0 = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        model[1].weight.view(-1)[:10] += torch.arange(1, 11, dtype=torch.float32)
    opt = DropBack(model.parameters(), lr=0.1, k=4)
    base = w0[0].reshape(-1)[:10].numpy()
    empty = (np.zeros(0, np.int64), np.zeros(0, np.float32))
    opt.set_tracked([(np.arange(10), base)] + [empty] * 5)
    idx, delta = opt.tracked()[0]
    assert list(idx) == [6, 7, 8, 9]
    np.testing.assert_allclose(delta, [7, 8, 9, 10], rtol=1e-6)
    assert torch.equal(model[1].weight.view(-1)[:6], w0[0].view(-1)[:6])


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"lr": 0.0, "k": 5}, "learning rate: 0.0"),
        ({"lr": -1.0, "k": 5}, "-1.0"),
        ({"lr": float("nan"), "k": 5}, "nan"),
        ({"lr": 0.1, "k": 0}, "k: 0"),
        ({"lr": 0.1, "k": 2.5}, "k: 2.5"),
        ({"lr": 0.1, "k": 5, "freeze_after": -3}, "freeze_after: -3"),
        ({"lr": 0.1, "k": 5, "init_decay": 1.0}, "init_decay: 1.0"),
    ],
)
def test_invalid_hyperparameters_name_the_bad_value(kwargs, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("-", r"\-")):
        DropBack(seeded_model("mlp-90k", 0).parameters(), **kwargs)


# ----- the optimizer in torch's shape -----------------------------------------------------


def test_every_hyperparameter_is_in_defaults_and_each_group():
    model = seeded_model("mlp-90k", 0)
    params = list(model.parameters())
    opt = DropBack([{"params": params[:2], "lr": 0.05}, {"params": params[2:]}], lr=0.1, k=50, freeze_after=3)
    assert opt.defaults == {"lr": 0.1, "k": 50, "freeze_after": 3, "init_decay": None}
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.1]
    assert all(g["k"] == 50 and g["freeze_after"] == 3 and g["init_decay"] is None for g in opt.param_groups)
    assert (opt.k, opt.freeze_after, opt.init_decay) == (50, 3, None)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.1, "k": 0},
        {"lr": 0.1, "k": -4},
        {"lr": 0.1, "k": True},
        {"lr": 0.0, "k": 5},
        {"lr": "0.1", "k": 5},
    ],
)
def test_bad_k_or_lr_is_a_value_error(kwargs):
    with pytest.raises(ValueError, match="Invalid"):
        DropBack(seeded_model("mlp-90k", 0).parameters(), **kwargs)


def test_groups_may_set_lr_but_not_the_global_budget():
    params = list(seeded_model("mlp-90k", 0).parameters())
    with pytest.raises(ValueError, match=r"learning rate: -0\.5"):
        DropBack([{"params": params[:2], "lr": -0.5}, {"params": params[2:]}], lr=0.1, k=5)
    for name, value in (("k", 7), ("freeze_after", 2), ("init_decay", 0.9)):
        with pytest.raises(ValueError, match=f"a param group cannot set {name}="):
            DropBack([{"params": params[:2], name: value}, {"params": params[2:]}], lr=0.1, k=5)
    opt = DropBack(params[:2], lr=0.1, k=5)
    with pytest.raises(ValueError, match="pass every group to the constructor"):
        opt.add_param_group({"params": params[2:]})


def test_state_lives_per_parameter_in_self_state():
    model = seeded_model("mlp-90k", 0)
    w0 = [p.detach().clone().reshape(-1) for p in model.parameters()]
    opt = DropBack(model.parameters(), lr=0.1, k=700)
    params = list(model.parameters())
    assert all(opt.state[p]["positions"].numel() == 0 for p in params)  # there before the first step
    _train(model, opt, _batches(6))
    assert set(opt.state) == set(params)
    for p, q, offset, (local, _) in zip(params, w0, _offsets(model), opt.tracked(), strict=True):
        st = opt.state[p]
        pos = st["positions"]
        assert pos.dtype == torch.int64 and st["initial"].dtype == torch.float32
        assert torch.all(pos[1:] > pos[:-1])  # sorted, unique
        idx = pos - offset  # flat positions: the parameter's offset plus its local index
        assert bool((idx >= 0).all()) and bool((idx < p.numel()).all())
        np.testing.assert_array_equal(local, idx.numpy())
        assert torch.equal(st["initial"], q[idx])  # w0 at the tracked weights, bit for bit
        untracked = torch.ones(p.numel(), dtype=torch.bool)
        untracked[idx] = False
        assert torch.equal(p.detach().reshape(-1)[untracked], q[untracked])
    assert sum(opt.state[p]["positions"].numel() for p in params) == opt.num_tracked == 700
    shared = opt.state[params[0]]
    assert (shared["step"], shared["frozen"]) == (6, False) and shared["threshold"] > 0
    assert opt.state_bytes() == FIXED_STATE_BYTES + DENSE_STATE_BYTES_PER_TRACKED * 700
    # state_dict() is torch's own: the per-parameter state, keyed by position.
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    for i, p in enumerate(params):
        assert sd["state"][i]["positions"] is opt.state[p]["positions"]


def _select_inputs(seed=0, n=5000, k=300, n_tracked=300):
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal(n).astype(np.float32)
    tracked = np.sort(rng.choice(n, n_tracked, replace=False))
    weights = w0.copy()
    weights[tracked] += rng.standard_normal(n_tracked).astype(np.float32) * 0.05
    grads = rng.standard_normal(n).astype(np.float32)
    return weights, grads, tracked, w0[tracked].copy(), k


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("init_decay", [None, 0.9])
def test_dropback_select_is_pure(frozen, init_decay):
    weights, grads, tracked, initial, k = _select_inputs()
    copies = [a.copy() for a in (grads, tracked, initial)]
    kwargs = {"lr": [(2000, 0.05), (5000, 0.2)], "k": k, "threshold": 0.01, "frozen": frozen}
    runs = []
    for _ in range(2):
        w = weights.copy()
        runs.append((w, dropback_select(w, grads, tracked, initial, init_decay=init_decay, **kwargs)))
    (w1, a), (w2, b) = runs
    assert w1.tobytes() == w2.tobytes() and not np.array_equal(w1, weights)  # weights: in place, documented
    assert a.tracked.tobytes() == b.tracked.tobytes() and a.initial.tobytes() == b.initial.tobytes()
    assert a.threshold == b.threshold
    for arr, copy in zip((grads, tracked, initial), copies, strict=True):
        assert arr.tobytes() == copy.tobytes()  # inputs other than weights are not written
    assert a.tracked.size == k and np.all(np.diff(a.tracked) > 0)
    if frozen:
        assert np.array_equal(a.tracked, tracked) and a.threshold == 0.01
        assert (a.initial is initial) == (init_decay is None)


def test_dropback_select_keeps_the_top_k_and_resets_the_rest():
    weights, grads, tracked, initial, k = _select_inputs(seed=3)
    w0 = weights.copy()
    w0[tracked] = initial
    moved = weights - 0.1 * grads
    out = weights.copy()
    sel = dropback_select(out, grads, tracked, initial, lr=[(weights.size, 0.1)], k=k)
    score = np.abs(moved - w0)
    assert set(sel.tracked) == set(np.argsort(-score, kind="stable")[:k])
    np.testing.assert_array_equal(sel.initial, w0[sel.tracked])
    rest = np.setdiff1d(np.arange(weights.size), sel.tracked)
    assert out[rest].tobytes() == w0[rest].tobytes()
    np.testing.assert_allclose(out[sel.tracked], moved[sel.tracked], rtol=0, atol=1e-6)


def test_dropback_select_breaks_ties_tracked_first_by_flat_index():
    # Four weights tie at the k-th score: two tracked (1, 4) and two entrants (2, 5); k=2 keeps
    # weight 0 (highest) and one of the tied: tracked go first, lowest index first, so 5 stays.
    weights = np.zeros(6, np.float32)
    weights[[1, 4]] = 0.5
    grads = np.array([-3.0, 0.0, -1.0, 0.0, 0.0, -1.0], np.float32)
    tracked, initial = np.array([1, 4]), np.zeros(2, np.float32)
    sel = dropback_select(weights, grads, tracked, initial, lr=[(6, 0.5)], k=2)
    assert list(sel.tracked) == [0, 5]
    assert list(weights) == [1.5, 0.0, 0.0, 0.0, 0.0, 0.5]


def test_zero_grad_honours_set_to_none():
    model = seeded_model("mlp-90k", 0)
    opt = DropBack(model.parameters(), lr=0.1, k=100)
    x, y = _batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    opt.zero_grad(set_to_none=False)
    for p in model.parameters():
        assert p.grad is not None and p.grad.shape == p.shape and not p.grad.any()
    opt.zero_grad()  # the default keeps the flat gradient buffer
    assert all(p.grad is not None for p in model.parameters())
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())


def test_set_to_none_trains_exactly_like_the_flat_buffer():
    batches = _batches(6)
    runs = []
    for set_to_none in (False, True):
        model = seeded_model("mlp-90k", 0)
        opt = DropBack(model.parameters(), lr=0.1, k=300)
        loss_fn = nn.CrossEntropyLoss()
        for x, y in batches:
            opt.zero_grad(set_to_none=set_to_none)
            loss_fn(model(x), y).backward()
            opt.step()
        runs.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(*runs)


@pytest.mark.parametrize("kwargs", [{"freeze_after": 8}, {"init_decay": 0.9}, {}])
def test_state_dict_round_trip_through_torch_save_resumes_identically(tmp_path, kwargs):
    batches = _batches(16)
    a_model = seeded_model("mlp-90k", 0)
    a = DropBack(a_model.parameters(), lr=0.1, k=600, **kwargs)
    _train(a_model, a, batches[:6])
    torch.save({"model": a_model.state_dict(), "opt": a.state_dict()}, tmp_path / "ckpt.pt")
    saved = a.state_dict()
    before = {
        i: {key: (v.clone() if torch.is_tensor(v) else v) for key, v in st.items()}
        for i, st in saved["state"].items()
    }
    _train(a_model, a, batches[6:])
    # An earlier state_dict() is a snapshot: the steps since replaced the state, never wrote it.
    for i, st in before.items():
        assert saved["state"][i].keys() == st.keys()
        for key, v in st.items():
            assert (
                torch.equal(saved["state"][i][key], v) if torch.is_tensor(v) else saved["state"][i][key] == v
            )
    ckpt = torch.load(tmp_path / "ckpt.pt")
    b_model = seeded_model("mlp-90k", 0)
    b_model.load_state_dict(ckpt["model"])
    b = DropBack(b_model.parameters(), lr=0.5, k=5)  # groups' hyperparameters come from the checkpoint
    b.load_state_dict(ckpt["opt"])
    assert (b.k, b.param_groups[0]["lr"], b.init_decay) == (600, 0.1, kwargs.get("init_decay"))
    assert all(b.state[p]["positions"].dtype == torch.int64 for p in b_model.parameters())
    _train(b_model, b, batches[6:])
    for p, q in zip(a_model.parameters(), b_model.parameters(), strict=True):
        assert p.detach().numpy().tobytes() == q.detach().numpy().tobytes()
    assert (a.steps, a.frozen) == (b.steps, b.frozen) == (16, "freeze_after" in kwargs)
    for p, q in zip(a_model.parameters(), b_model.parameters(), strict=True):
        assert torch.equal(a.state[p]["positions"], b.state[q]["positions"])


def test_load_state_dict_refuses_a_corrupt_tracked_set():
    model = seeded_model("mlp-90k", 0)
    opt = DropBack(model.parameters(), lr=0.1, k=50)
    _train(model, opt, _batches(2))
    sd = opt.state_dict()
    bad = {**sd, "state": {**sd["state"], 1: {**sd["state"][1], "positions": torch.tensor([78405, 78403])}}}
    bad["state"][1]["initial"] = torch.zeros(2)
    with pytest.raises(ValueError, match="parameter 1: loaded positions are not sorted"):
        DropBack(seeded_model("mlp-90k", 0).parameters(), lr=0.1, k=50).load_state_dict(bad)
    out_of_range = {
        **sd,
        "state": {**sd["state"], 1: {"positions": torch.tensor([3]), "initial": torch.zeros(1)}},
    }
    with pytest.raises(ValueError, match=r"parameter 1: .* in \[78400, 78500\)"):
        DropBack(seeded_model("mlp-90k", 0).parameters(), lr=0.1, k=50).load_state_dict(out_of_range)
    nan_bar = {**sd, "state": {**sd["state"], 0: {**sd["state"][0], "threshold": float("nan")}}}
    with pytest.raises(ValueError, match="loaded counters out of range"):
        DropBack(seeded_model("mlp-90k", 0).parameters(), lr=0.1, k=50).load_state_dict(nan_bar)
