"""skip_nonfinite: a NaN or Inf anywhere in any gradient skips the step and changes nothing."""

import numpy as np
import pytest
from optimizer_cases import CASES, grad_of

import fastopt as fo


def _snapshot(params, opt):
    return [p.copy() for p in params], opt.state_dict()


def _equal(snap, params, opt):
    ps, sd = snap
    now = opt.state_dict()
    assert all(np.array_equal(a, b) for a, b in zip(ps, params))
    assert now["param_groups"] == sd["param_groups"]
    for i in sd["state"]:
        for k, v in sd["state"][i].items():
            assert np.array_equal(now["state"][i][k], v), k


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_nonfinite_gradient_skips_the_step(case, bad):
    _, cls, kwargs = case
    rng = np.random.default_rng(0)
    params = [rng.standard_normal((5, 4)), rng.standard_normal(7)]
    seen = []
    kwargs = dict(kwargs)
    base_lr = kwargs.pop("lr", 0.01)
    opt = cls(params, lr=lambda k: seen.append(k) or base_lr, skip_nonfinite=True, **kwargs)
    for t in range(3):
        opt.step(grad_of(params, t))
    snap = _snapshot(params, opt)
    for where in [(0, (2, 3)), (1, (6,))]:
        g = grad_of(params, 3)
        g[where[0]][where[1]] = bad
        opt.step(g)
        assert opt.last_step_taken is False
        _equal(snap, params, opt)
    assert opt.skipped_steps == 2
    opt.step(grad_of(params, 4))  # (t = 3 flips every sign: Rprop would rightly not move)
    assert opt.last_step_taken is True
    assert not all(np.array_equal(a, b) for a, b in zip(snap[0], params))
    # the schedule saw steps 0,1,2 and the retried 3rd; the skipped steps did not advance it
    assert sorted(set(seen)) == [0, 1, 2, 3]


def test_paramset_nonfinite_skip_and_counter_in_state_dict():
    ps = fo.ParamSet({"w": np.ones((3, 3)), "b": np.ones(3)})
    opt = fo.Adam(ps, lr=0.1, skip_nonfinite=True)
    ps.grads["b"][1] = np.nan
    opt.step()
    assert opt.skipped_steps == 1 and np.all(ps.flat == 1) and not opt.state
    assert opt.state_dict()["skipped_steps"] == 1
    other = fo.Adam(fo.ParamSet({"w": np.ones((3, 3)), "b": np.ones(3)}), lr=0.1)
    other.load_state_dict(opt.state_dict())
    assert other.skipped_steps == 1


def test_without_the_option_nan_propagates_like_torch():
    from oracle import torch_or_skip

    torch = torch_or_skip()
    w = np.ones(3)
    tw = torch.ones(3, dtype=torch.float64, requires_grad=True)
    g = np.array([1.0, np.nan, 1.0])
    fo.Adam([w], lr=0.1).step([g])
    topt = torch.optim.Adam([tw], lr=0.1, foreach=False)
    tw.grad = torch.tensor(g)
    topt.step()
    np.testing.assert_array_equal(w, tw.detach().numpy())
    assert np.isnan(w[1]) and not np.isnan(w[0])
