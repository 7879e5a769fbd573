"""Schedule-free SGD and AdamW against the ``schedulefree`` package (its single-tensor path,
``foreach=False``): the train point y after every one of 200 steps, the eval point x (after
``eval()``) every 25 steps, and back to y with ``train()``; then the state (z, exp_avg_sq,
weight_sum, lr_max). ``schedulefree`` is an optional oracle installed beside torch;
FASTOPT_REQUIRE_ORACLE=1 makes a missing one an error (tests/oracle.py).
"""

import numpy as np
import pytest
from oracle import import_or_skip, torch_or_skip
from test_torch_oracle import (  # noqa: F401 (the dtype fixture)
    assert_close,
    initial_arrays,
    loss_grad,
    torch_default_dtype,
)

import fastopt as fo

torch = torch_or_skip()
schedulefree = import_or_skip("schedulefree")

pytestmark = pytest.mark.oracle

STEPS = 200
EVAL_EVERY = 25

CASES = {
    "sgd": ("SGDScheduleFree", dict(lr=0.2)),
    "sgd-all": (
        "SGDScheduleFree",
        dict(lr=0.3, momentum=0.8, weight_decay=0.02, warmup_steps=20, r=0.5, weight_lr_power=1.0),
    ),
    "adamw": ("AdamWScheduleFree", dict(lr=0.02)),
    "adamw-all": (
        "AdamWScheduleFree",
        dict(
            lr=0.03,
            betas=(0.6, 0.99),  # lerp weight 1 - 1/0.6 = -2/3 in eval(): the other branch
            eps=1e-6,
            weight_decay=0.05,
            warmup_steps=30,
            r=1.0,
            weight_lr_power=3.0,
        ),
    ),
}


class SFPair:
    """A fastopt schedule-free optimizer and the package's, over equal copies of the arrays."""

    def __init__(self, name, kwargs, dtype, structure="list", backend=None):
        self.dtype, self.structure = dtype, structure
        arrays = initial_arrays(dtype)
        cls = getattr(fo, name)
        if structure == "paramset":
            self.ps = fo.ParamSet({f"p{i}": a for i, a in enumerate(arrays)})
            self.views = [self.ps[f"p{i}"] for i in range(len(arrays))]
            self.opt = cls(self.ps, backend=backend, **kwargs)
        else:
            self.views = [a.copy() for a in arrays]
            self.opt = cls(self.views, backend=backend, **kwargs)
        self.tparams = [torch.tensor(a.copy()) for a in arrays]
        self.topt = getattr(schedulefree, name)(self.tparams, foreach=False, **kwargs)
        self.topt.train()
        self.k = 0

    def step(self):
        grads = [loss_grad(p, self.k, i) for i, p in enumerate(self.views)]
        if self.structure == "paramset":
            for i, g in enumerate(grads):
                self.ps.grads[f"p{i}"][...] = g
            self.opt.step()
        else:
            self.opt.step(grads)
        for i, p in enumerate(self.tparams):
            p.grad = torch.from_numpy(loss_grad(p.numpy(), self.k, i))
        self.topt.step()
        self.k += 1

    def compare(self, what):
        for i, (ours, p) in enumerate(zip(self.views, self.tparams)):
            assert_close(ours, p.numpy(), self.dtype, f"{what}, param {i}, step {self.k}")


def run(pair, steps=STEPS):
    eval_gaps = []
    for _ in range(steps):
        pair.step()
        pair.compare("train point y")
        if pair.k % EVAL_EVERY == 0:
            y = [v.copy() for v in pair.views]
            pair.opt.eval()
            pair.topt.eval()
            assert not pair.opt.train_mode
            pair.compare("eval point x")
            eval_gaps.append(max(float(np.max(np.abs(a - b))) for a, b in zip(y, pair.views)))
            pair.opt.train()
            pair.topt.train()
            pair.compare("train point y after train()")
    # x differs from y (the swap did something) and the run moved
    assert min(eval_gaps) > 1e-6
    start = initial_arrays(pair.dtype)
    assert max(float(np.max(np.abs(v - s))) for v, s in zip(pair.views, start)) > 1e-2


def compare_state(pair):
    sd = pair.opt.state_dict()
    assert sd["train_mode"] is True
    group = pair.topt.param_groups[0]
    tstates = [pair.topt.state[p] for p in pair.tparams]
    entries = sd["state"]
    if pair.structure == "paramset":
        (entry,) = entries.values()
        for name in [k for k in tstates[0] if k in entry]:
            ref = np.concatenate([t[name].numpy().reshape(-1) for t in tstates])
            assert_close(entry[name].reshape(-1), ref, pair.dtype, name)
        entries = [entry]
    else:
        for entry, t in zip(entries.values(), tstates):
            assert set(entry) - {"step", "weight_sum", "lr_max"} == set(t)
            for name in t:
                assert_close(entry[name], t[name].numpy(), pair.dtype, name)
        entries = list(entries.values())
    for entry in entries:
        assert entry["step"] == group["k"] == STEPS
        assert entry["weight_sum"] == pytest.approx(group["weight_sum"], rel=1e-12)
        assert entry["lr_max"] == group["lr_max"]


@pytest.mark.parametrize("case", list(CASES))
def test_schedulefree_matches_package(case, dtype):
    name, kwargs = CASES[case]
    pair = SFPair(name, kwargs, dtype)
    run(pair)
    compare_state(pair)


@pytest.mark.parametrize("case", ["sgd-all", "adamw-all"])
def test_schedulefree_paramset_and_reference_match_package(case):
    name, kwargs = CASES[case]
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for structure, backend in (("paramset", None), ("list", "numpy")):
            pair = SFPair(name, kwargs, np.float64, structure=structure, backend=backend)
            run(pair)
            compare_state(pair)
    finally:
        torch.set_default_dtype(old)


def test_step_in_eval_mode_is_refused_and_state_dict_keeps_the_mode():
    p = [np.linspace(-1, 1, 5)]
    opt = fo.AdamWScheduleFree(p, lr=0.1)
    opt.step([np.ones(5)])
    opt.eval()
    before = p[0].copy()
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step([np.ones(5)])
    np.testing.assert_array_equal(p[0], before)
    saved = opt.state_dict()
    assert saved["train_mode"] is False
    q = [before.copy()]
    other = fo.AdamWScheduleFree(q, lr=0.1)
    other.load_state_dict(saved)
    assert not other.train_mode
    opt.train()
    other.train()  # restored eval mode: train() moves q back to y exactly as it moves p
    np.testing.assert_array_equal(q[0], p[0])


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("SGDScheduleFree", dict(momentum=0.0), "momentum"),
        ("SGDScheduleFree", dict(momentum=1.0), "momentum"),
        ("SGDScheduleFree", dict(warmup_steps=-1), "warmup_steps"),
        ("SGDScheduleFree", dict(weight_lr_power=-2.0), "weight_lr_power"),
        ("AdamWScheduleFree", dict(betas=(0.0, 0.999)), "betas"),
        ("AdamWScheduleFree", dict(betas=(0.9, 1.0)), "betas"),
        ("AdamWScheduleFree", dict(eps=-1e-8), "eps"),
        ("AdamWScheduleFree", dict(r=float("nan")), "r"),
        ("AdamWScheduleFree", dict(lr=-0.1), "lr"),
    ],
)
def test_bad_hyperparameters(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        getattr(fo, name)([np.zeros(3)], **kwargs)


def test_warmup_steps_must_be_an_int():
    with pytest.raises(TypeError, match="warmup_steps"):
        fo.SGDScheduleFree([np.zeros(3)], warmup_steps=2.5)
