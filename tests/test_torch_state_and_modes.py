"""fastopt.torch: ``opt.state`` filled at the step that allocates it (and current after every
step), and the schedule-free adapters' ``train()`` / ``eval()`` against the fastopt core."""

import numpy as np
import pytest
from oracle import import_or_skip

torch = import_or_skip("torch")


import fastopt  # noqa: E402
import fastopt.torch as fot  # noqa: E402

SCHEDULE_FREE = {
    "SGDScheduleFree": ({"lr": 0.5, "momentum": 0.8}, {"lr": 0.2, "momentum": 0.6}),
    "AdamWScheduleFree": (
        {"lr": 0.1, "betas": (0.9, 0.99), "weight_decay": 1e-2},
        {"lr": 0.05, "betas": (0.7, 0.999), "warmup_steps": 2},
    ),
}


def bits(x):
    return np.asarray(x.detach().numpy() if isinstance(x, torch.Tensor) else x).view(np.uint32)


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def backward(model, seed):
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(seed))
    model(x).pow(2).mean().backward()


# ---------------------------------------------------------------- opt.state after step()
@pytest.mark.parametrize("name", ["Adam", "NAdam", "ASGD", "Adagrad"])
def test_state_filled_and_current_after_each_step(name):
    mt, mf = mlp(), mlp()
    ot = getattr(torch.optim, name)(mt.parameters(), lr=0.05)
    of = getattr(fot, name)(mf.parameters(), lr=0.05)
    for t in range(4):
        for m, o in ((mt, ot), (mf, of)):
            o.zero_grad()
            backward(m, t)
            if t == 2:  # the last layer's bias has no gradient: its step count stays
                m[2].bias.grad = None
            o.step()
        assert len(of.state) == len(ot.state) == 4
        for pt, pf in zip(mt.parameters(), mf.parameters()):
            st, sf = ot.state[pt], of.state[pf]
            assert set(sf) == set(st), (t, sorted(sf), sorted(st))
            for key, want in st.items():
                got = sf[key]
                assert isinstance(got, torch.Tensor) and got.shape == want.shape, key
                assert got.dtype == want.dtype, key
                np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
            assert float(sf["step"]) == sf["step"].item() == float(st["step"])


def test_state_entries_are_views_of_the_flat_state():
    model = mlp()
    opt = fot.Adam(model.parameters(), lr=0.1)
    backward(model, 0)
    opt.step()
    flat = opt._tensors[0]["exp_avg"]
    lo, hi = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
    entries = [opt.state[p] for p in model.parameters()]
    before = [e["exp_avg"].clone() for e in entries]
    steps = [e["step"] for e in entries]
    assert all(lo <= e["exp_avg"].data_ptr() < hi for e in entries)
    opt.step()  # the same gradients again: the views and the step tensors move in place
    for p, entry, b, step in zip(model.parameters(), entries, before, steps):
        assert opt.state[p] is entry
        assert not torch.equal(entry["exp_avg"], b)
        assert float(step) == 2.0
    opt.step()
    assert all(float(s) == 3.0 for s in steps)


def test_steps_publish_state_once(monkeypatch):
    """The per-parameter publishing runs at the step that allocates the state, not later."""
    model = mlp()
    opt = fot.AdamW(model.parameters(), lr=0.1)
    calls = []
    publish = opt._publish
    monkeypatch.setattr(opt, "_publish", lambda *a: calls.append(a) or publish(*a))
    backward(model, 0)
    for _ in range(5):
        opt.step()
    assert len(calls) == 1
    assert all(float(opt.state[p]["step"]) == 5 for p in model.parameters())


def test_state_of_a_parameter_stepped_later():
    model = mlp()
    opt = fot.Adam(model.parameters(), lr=0.1)
    backward(model, 0)
    model[0].weight.grad = None
    opt.step()
    assert model[0].weight not in opt.state and len(opt.state) == 3
    backward(model, 1)
    opt.step()
    assert float(opt.state[model[0].weight]["step"]) == 1.0
    assert float(opt.state[model[0].bias]["step"]) == 2.0


def test_state_dict_scalars_are_a_snapshot():
    """torch.optim increments a loaded ``"step"`` in place: it must not be this optimizer's."""
    mf, mt = mlp(), mlp()
    of = fot.Adam(mf.parameters(), lr=0.1)
    backward(mf, 0)
    of.step()
    sd = of.state_dict()
    ot = torch.optim.Adam(mt.parameters(), lr=0.1)
    ot.load_state_dict(sd)
    backward(mt, 1)
    ot.step()
    ot.step()
    assert float(of.state[next(mf.parameters())]["step"]) == 1.0
    of.step()
    assert float(sd["state"][0]["step"]) == 3.0  # torch's two steps, not fastopt's
    assert float(of.state_dict()["state"][0]["step"]) == 2.0


def test_state_published_by_load_state_dict_and_current_after():
    mt, mf = mlp(), mlp()
    ot = torch.optim.NAdam(mt.parameters(), lr=0.05)
    for t in range(3):
        backward(mt, t)
        ot.step()
    of = fot.NAdam(mf.parameters(), lr=0.05)
    of.load_state_dict(ot.state_dict())
    p = next(mf.parameters())
    assert float(of.state[p]["step"]) == 3.0
    backward(mf, 7)
    of.step()
    assert float(of.state[p]["step"]) == 4.0
    want = (
        float(ot.state[next(mt.parameters())]["mu_product"])
        * 0.9
        * (1.0 - 0.5 * 0.96 ** (4 * 0.004))
    )
    np.testing.assert_allclose(float(of.state[p]["mu_product"]), want, rtol=1e-6)


def test_int8_state_filled_after_step():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 80))
    q = torch.nn.Parameter(torch.randn(3))
    opt = fot.AdamW([p, q], state_dtype="int8")
    p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.uint8
    assert opt.state[p]["exp_avg_qmap"] == "signed"
    assert opt.state[q]["exp_avg"].dtype == torch.float32
    opt.step()
    assert float(opt.state[p]["step"]) == float(opt.state[q]["step"]) == 2.0


# ---------------------------------------------------------------- schedule-free modes
def sf_pair(name):
    """(torch params, adapter, core arrays, core) over the same values, two param groups."""
    torch.manual_seed(0)
    values = [torch.randn(4, 3), torch.randn(5), torch.randn(2, 2)]
    params = [torch.nn.Parameter(v.clone()) for v in values]
    arrays = [v.clone().numpy() for v in values]
    g0, g1 = SCHEDULE_FREE[name]
    adapter = getattr(fot, name)([{"params": params[:2], **g0}, {"params": params[2:], **g1}])
    core = getattr(fastopt, name)([{"params": arrays[:2], **g0}, {"params": arrays[2:], **g1}])
    return params, adapter, arrays, core


def step_both(params, adapter, arrays, core, seed):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    adapter.step()
    core.step([[g.numpy() for g in grads[:2]], [grads[2].numpy()]])


def assert_same_bits(params, arrays, label):
    for i, (p, a) in enumerate(zip(params, arrays)):
        assert np.array_equal(bits(p), bits(a)), f"{label}: param {i}"


@pytest.mark.parametrize("name", sorted(SCHEDULE_FREE))
def test_schedule_free_eval_train_match_the_core_bit_for_bit(name):
    params, adapter, arrays, core = sf_pair(name)
    for t in range(4):
        step_both(params, adapter, arrays, core, t)
    y = [p.detach().clone() for p in params]
    adapter.eval()
    core.eval()
    assert adapter.train_mode is core.train_mode is False
    assert_same_bits(params, arrays, "eval")
    assert not torch.equal(params[0], y[0])  # x differs from y
    adapter.eval()  # a no-op in eval mode, as the core's
    assert_same_bits(params, arrays, "eval twice")
    adapter.train()
    core.train()
    assert adapter.train_mode is True
    assert_same_bits(params, arrays, "train")
    for t in range(4, 6):
        step_both(params, adapter, arrays, core, t)
    assert_same_bits(params, arrays, "steps after train")


@pytest.mark.parametrize("name", sorted(SCHEDULE_FREE))
def test_schedule_free_eval_matches_the_schedulefree_package(name):
    schedulefree = import_or_skip("schedulefree")
    torch.manual_seed(0)
    w = torch.randn(6, 5)
    p, q = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    hyper = SCHEDULE_FREE[name][0]
    ours, theirs = getattr(fot, name)([p], **hyper), getattr(schedulefree, name)([q], **hyper)
    theirs.train()
    for t in range(5):
        g = torch.randn(6, 5, generator=torch.Generator().manual_seed(t))
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    ours.train()
    theirs.train()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def test_schedule_free_step_in_eval_mode_raises_before_anything():
    params, adapter, arrays, core = sf_pair("AdamWScheduleFree")
    step_both(params, adapter, arrays, core, 0)
    adapter.eval()
    before = [p.detach().clone() for p in params]
    ran = []
    with pytest.raises(RuntimeError, match=r"AdamWScheduleFree.step\(\) in eval mode"):
        adapter.step(lambda: ran.append(1))
    assert not ran
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_schedule_free_eval_leaves_parameters_without_state():
    torch.manual_seed(0)
    p, q = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = fot.SGDScheduleFree([p, q], lr=0.5)
    opt.eval()  # before any step: nothing moves
    assert opt.train_mode is False
    opt.train()
    p.grad = torch.ones(3)
    opt.step()  # after one step x = y = z: a second one separates them
    p.grad = torch.tensor([1.0, -2.0, 3.0])
    opt.step()
    q_before, p_before = q.detach().clone(), p.detach().clone()
    opt.eval()
    assert torch.equal(q, q_before) and not torch.equal(p, p_before)


def test_schedule_free_mode_round_trips_through_state_dict():
    params, adapter, arrays, core = sf_pair("SGDScheduleFree")
    step_both(params, adapter, arrays, core, 0)
    assert adapter.state_dict()["train_mode"] is True
    adapter.eval()
    sd = adapter.state_dict()
    assert sd["train_mode"] is False
    assert core.state_dict()["train_mode"] is True  # the core's key, here in train mode
    core.eval()
    assert core.state_dict()["train_mode"] is False

    other = fot.SGDScheduleFree([{"params": params[:2]}, {"params": params[2:]}])
    other.load_state_dict(sd)
    assert other.train_mode is False
    with pytest.raises(RuntimeError, match="eval mode"):
        other.step()
    other.train()  # the parameters hold x (the saving optimizer's eval): back to y
    core.train()
    assert_same_bits(params, arrays, "train after load")

    fresh = fot.SGDScheduleFree([{"params": params[:2]}, {"params": params[2:]}])
    no_mode = {k: v for k, v in sd.items() if k != "train_mode"}
    fresh.eval()
    fresh.load_state_dict(no_mode)  # absent: train mode, as the core reads it
    assert fresh.train_mode is True


def test_schedule_free_bad_train_mode_raises_before_any_write():
    params, adapter, arrays, core = sf_pair("AdamWScheduleFree")
    step_both(params, adapter, arrays, core, 0)
    sd = adapter.state_dict()
    other = fot.AdamWScheduleFree([{"params": params[:2]}, {"params": params[2:]}])
    with pytest.raises(TypeError, match="train_mode must be a bool, got 'no'"):
        other.load_state_dict({**sd, "train_mode": "no"})
    assert other.train_mode is True and len(other.state) == 0
