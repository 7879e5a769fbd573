"""ASGD against torch.optim.ASGD (single-tensor path): parameters after every one of 250 steps,
and the state at the end (the averaged parameters ``ax``, ``eta``, ``mu``, ``step``).

The harness is test_torch_oracle's (a coupled loss whose gradient depends on each optimizer's
own iterate, so differences feed back). For float64 torch's default dtype is float64, so its
``eta``/``mu`` tensors are float64 like fastopt's host scalars.
"""

import numpy as np
import pytest
from oracle import torch_or_skip
from test_torch_oracle import (  # noqa: F401 (fixtures)
    Pair,
    assert_close,
    f64,
    run_and_compare,
    torch_default_dtype,
)

import fastopt as fo

torch = torch_or_skip()

pytestmark = pytest.mark.oracle

STEPS = 250

CASES = {
    # t0 = 1e6 (the default): ax is a copy of the iterate throughout
    "default": dict(lr=0.05),
    # averaging from step 30 on (mu = 1/(t - t0) < 1), decay term lambd, L2
    "averaging": dict(lr=0.05, lambd=0.01, alpha=0.6, t0=30.0, weight_decay=0.02),
    "maximize-t0-0": dict(lr=0.03, lambd=1e-3, t0=0.0, maximize=True),
}


def compare_asgd_state(pair, steps):
    sd = pair.opt.state_dict()["state"]
    for i, p in enumerate(pair.tparams):
        ours, theirs = sd[i], pair.topt.state[p]
        assert set(ours) == {"step", "eta", "mu", "ax"}
        assert ours["step"] == steps == int(theirs["step"].item())
        for name in ("eta", "mu"):
            assert ours[name] == pytest.approx(float(theirs[name].item()), rel=1e-6, abs=0)
        assert_close(ours["ax"], theirs["ax"].detach().numpy(), pair.dtype, f"ax of param {i}")
    return sd


@pytest.mark.parametrize("case", list(CASES))
def test_asgd_matches_torch(case, dtype):
    pair = Pair("ASGD", CASES[case], dtype)
    run_and_compare(pair, steps=STEPS, label=f"asgd/{case}")
    sd = compare_asgd_state(pair, STEPS)
    if case == "averaging":  # the average moved away from the iterate: averaging happened
        gap = max(np.max(np.abs(sd[i]["ax"] - v)) for i, v in enumerate(pair.views))
        assert gap > 1e-3
        assert sd[0]["mu"] == 1 / (STEPS - 30)


@pytest.mark.parametrize("structure", ["paramset", "groups"])
def test_asgd_structures_and_reference_match_torch(structure, f64):  # noqa: F811
    pair = Pair("ASGD", CASES["averaging"], f64, structure=structure)
    run_and_compare(pair, steps=STEPS, label=f"asgd/{structure}")
    ref = Pair("ASGD", CASES["averaging"], f64, backend="numpy")
    run_and_compare(ref, steps=STEPS, label="asgd/numpy")
    compare_asgd_state(ref, STEPS)


def test_asgd_state_dict_round_trip_continues_like_torch(f64):  # noqa: F811
    """Saving and restoring mid-run (eta, mu and ax included) continues on torch's trajectory."""
    pair = Pair("ASGD", CASES["averaging"], f64)
    run_and_compare(pair, steps=100, label="asgd/first")
    saved = pair.opt.state_dict()
    params = [v.copy() for v in pair.views]
    fresh = fo.ASGD(params, **CASES["averaging"])
    fresh.load_state_dict(saved)
    pair.opt, pair.views = fresh, params
    for _ in range(STEPS - 100):
        pair.step()
    for ours, theirs in zip(pair.views, pair.torch_values()):
        assert_close(ours, theirs, np.float64, "after restore")
    compare_asgd_state(pair, STEPS)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(lambd=-1e-4), "lambd"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(t0=float("inf")), "t0"),
        (dict(weight_decay=-0.1), "weight_decay"),
    ],
)
def test_asgd_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fo.ASGD([np.zeros(3)], **kwargs)
