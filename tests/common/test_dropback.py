"""DropBack optimizer: exact agreement with a naive reference, O(k) state, freezing."""

import numpy as np
import pytest
import torch
from torch import nn

from dropfleet.common.dropback import DropBack
from dropfleet.common.errors import ConfigError
from dropfleet.common.layer_init import seeded_model


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
    assert total == 2 * k  # indices + w0 at tracked positions, nothing else
    assert opt.state_bytes() < 12 * k + 100
    assert all(v.numel() < 78400 for st in sd["state"].values() for v in st.values())


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
