"""fastopt.reference.muon (the readable spec of torch.optim.Muon) against fastopt.Muon."""

import numpy as np
import pytest

import fastopt as fo
from fastopt import reference

SHAPES = ((6, 4), (4, 6), (5, 5))  # tall (the iteration runs on its transpose), wide, square
SETTINGS = [
    {},
    {"nesterov": False, "adjust_lr_fn": "match_rms_adamw", "weight_decay": 0.0},
    {"adjust_lr_fn": "original", "weight_decay": 0.5, "momentum": 0.5, "ns_steps": 3},
]


def _defaults(**kw):
    """Muon's hyperparameters as the reference takes them: the class defaults, then ``kw``."""
    opt = fo.Muon(np.zeros((2, 2)), **kw)
    group = opt.param_groups[0]
    names = ("lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "eps", "ns_steps")
    return {k: group[k] for k in names} | {"adjust_lr_fn": group["adjust_lr_fn"]}


@pytest.mark.parametrize("kw", SETTINGS)
def test_reference_muon_equals_fastopt_muon_in_float64(kw):
    rng = np.random.default_rng(3)
    ps = fo.ParamSet({f"w{i}": rng.standard_normal(s) for i, s in enumerate(SHAPES)})
    opt = fo.Muon(ps, lr=0.02, ns_dtype="float64", **kw)
    hyper = _defaults(lr=0.02, **kw)
    ref = {n: ps[n].copy() for n in ps.names}
    states = {n: {"momentum_buffer": np.zeros(s)} for n, s in zip(ps.names, SHAPES)}
    for step in range(1, 21):
        for n in ps.names:
            g = rng.standard_normal(ps[n].shape)
            ps.grads[n][...] = g
            reference.muon(ref[n], g, states[n], step=step, ns_dtype="float64", **hyper)
        opt.step()
    buf = opt.state_dict()["state"][0]["momentum_buffer"]
    for n in ps.names:
        lo, hi = ps.offsets[n]
        np.testing.assert_allclose(ps[n], ref[n], rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(buf[lo:hi], states[n]["momentum_buffer"].ravel(), rtol=1e-13)
    assert not np.allclose(ref["w0"], ps["w0"] * 0)  # it moved


def test_newton_schulz_in_bfloat16_is_close_to_float64_and_orthogonalizes():
    """The bfloat16 mode rounds every stored result (as torch's bf16 tensors): within bfloat16
    resolution of the float64 iteration, and both bring the singular values near 1."""
    rng = np.random.default_rng(0)
    g = rng.standard_normal((8, 5))
    kw = {"ns_coefficients": (3.4445, -4.775, 2.0315), "ns_steps": 5, "eps": 1e-7}
    o64 = reference.newton_schulz(g, **kw)
    o16 = reference.newton_schulz(g, ns_dtype="bfloat16", **kw)
    assert o64.shape == o16.shape == g.shape and o16.dtype == np.float32
    assert np.abs(o16 - o64).max() < 0.05
    for o in (o64, o16):
        s = np.linalg.svd(o, compute_uv=False)
        assert s.min() > 0.5 and s.max() < 1.3
