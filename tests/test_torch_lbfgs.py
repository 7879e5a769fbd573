"""fastopt.torch.LBFGS against torch.optim.LBFGS: the same MLP and batches, 200 steps with an LR
scheduler, state_dicts exchanged both ways mid-run; bad input refused before anything changes."""

import copy

import pytest
from oracle import import_or_skip

torch = import_or_skip("torch")


import fastopt.torch as fot  # noqa: E402


def mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    return model.to(dtype)


def closure_of(model, opt, x, set_to_none=True, y=None):
    def closure():
        opt.zero_grad(set_to_none=set_to_none)
        loss = (model(x) - (0.0 if y is None else y)).pow(2).mean()
        loss.backward()
        return loss

    return closure


def max_diff(ma, mb):
    return max((a - b).abs().max().item() for a, b in zip(ma.parameters(), mb.parameters()))


# L-BFGS amplifies the last bits in which torch's dot products and fastopt's (float64 trees)
# differ: with large steps or the line search, two runs on fresh batches part after a few dozen
# steps (1e-12 at step 27, O(1) by step 200, as torch against itself with other sums would). The
# 200-step run on fresh batches takes steps small enough for the difference to stay at the
# rounding level; the strong-Wolfe run minimizes one batch (the usual use of the line search)
# for 15 steps (torch's float32 dot products round in float32, fastopt's in float64: float32
# runs part by 1e-6 after about 18 such steps).
RUNS = {
    "fixed_step": ({"lr": 0.1, "max_iter": 2, "line_search_fn": None}, 200, 90, False),
    "strong_wolfe": ({"lr": 0.3, "max_iter": 2, "line_search_fn": "strong_wolfe"}, 15, 7, True),
}


@pytest.mark.parametrize("run", list(RUNS))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_matches_torch_with_scheduler_and_state_swap(run, dtype, tol):
    kw, steps, swap_at, one_batch = RUNS[run]
    mf, mt = mlp(dtype=dtype), mlp(dtype=dtype)
    of = fot.LBFGS(mf.parameters(), history_size=6, **kw)
    ot = torch.optim.LBFGS(mt.parameters(), history_size=6, **kw)
    sf = torch.optim.lr_scheduler.StepLR(of, step_size=50, gamma=0.5)
    st = torch.optim.lr_scheduler.StepLR(ot, step_size=50, gamma=0.5)
    gen = torch.Generator().manual_seed(1)
    batch = torch.randn(64, 6, generator=gen, dtype=dtype), torch.randn(64, 3, generator=gen)
    for step in range(steps):
        x = batch[0] if one_batch else torch.randn(8, 6, generator=gen, dtype=dtype)
        y = batch[1].to(dtype) if one_batch else torch.randn(8, 3, generator=gen, dtype=dtype)
        lf = of.step(closure_of(mf, of, x, set_to_none=step % 2 == 0, y=y))
        lt = ot.step(closure_of(mt, ot, x, y=y))
        sf.step()
        st.step()
        assert lf.item() == pytest.approx(lt.item(), rel=10 * tol)
        if step == swap_at:  # state_dicts exchanged both ways
            a, b = copy.deepcopy(of.state_dict()), copy.deepcopy(ot.state_dict())
            of.load_state_dict(b)
            ot.load_state_dict(a)
    assert max_diff(mf, mt) < tol
    assert of.param_groups[0]["lr"] == ot.param_groups[0]["lr"]
    sf_, st_ = of.state_dict()["state"][0], ot.state_dict()["state"][0]
    assert set(sf_) == set(st_)
    for k in ("func_evals", "n_iter"):
        assert sf_[k] == st_[k], k
    assert len(sf_["old_dirs"]) == len(st_["old_dirs"])
    assert torch.allclose(sf_["d"], st_["d"], rtol=10 * tol, atol=10 * tol)


def test_a_parameter_without_gradient_counts_as_zero_as_in_torch():
    def model_pair():
        ma, mb = mlp(), mlp()
        extra = [torch.nn.Parameter(torch.ones(4, dtype=torch.float64)) for _ in range(2)]
        return ma, mb, extra

    ma, mb, (ea, eb) = model_pair()
    oa = fot.LBFGS([*ma.parameters(), ea], max_iter=3)
    ob = torch.optim.LBFGS([*mb.parameters(), eb], max_iter=3)
    x = torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        oa.step(closure_of(ma, oa, x))
        ob.step(closure_of(mb, ob, x))
    assert ea.grad is None and torch.equal(ea.detach(), torch.ones(4, dtype=torch.float64))
    assert max_diff(ma, mb) < 1e-10


def test_bad_input_is_refused_before_anything_changes():
    model = mlp()
    with pytest.raises(ValueError, match="per-parameter options"):
        fot.LBFGS([{"params": [model[0].weight]}, {"params": [model[0].bias]}])
    with pytest.raises(ValueError, match="one dtype"):
        fot.LBFGS([model[0].weight, torch.nn.Parameter(torch.zeros(3))])
    half = torch.nn.Linear(2, 2).to(torch.bfloat16)
    storage = half.weight.data_ptr()
    with pytest.raises(TypeError, match="float32 or float64"):
        fot.LBFGS(half.parameters())
    assert half.weight.data_ptr() == storage  # refused before the parameters moved
    with pytest.raises(ValueError, match="max_iter"):
        fot.LBFGS(model.parameters(), max_iter=0)
    opt = fot.LBFGS(model.parameters(), max_iter=3)
    with pytest.raises(TypeError, match="closure"):
        opt.step()
    x = torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    opt.step(closure_of(model, opt, x))
    before = copy.deepcopy(opt.state_dict())
    values = [p.detach().clone() for p in model.parameters()]
    bad = copy.deepcopy(before)
    bad["state"][0]["d"] = bad["state"][0]["d"][:-1]  # one element short
    with pytest.raises(ValueError, match=r"'d'.*shape"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(before)
    bad["param_groups"][0]["params"] = [0, 1]
    with pytest.raises(ValueError, match="2 parameters, this optimizer 4"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["state"][0]["n_iter"] == before["state"][0]["n_iter"]
    assert torch.equal(after["state"][0]["d"], before["state"][0]["d"])
    assert all(torch.equal(a, b) for a, b in zip(values, model.parameters()))
