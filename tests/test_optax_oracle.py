"""fastopt.Yogi and fastopt.Lion against optax, the reference both document (torch has neither).

The optax values are committed (tests/fixtures/optax_yogi_lion.npz, written by
tests/fixtures/make_optax_fixtures.py in an environment with optax and JAX): for every case and
dtype, the start, the gradient fed at every step and optax's parameters after every step. fastopt
takes the same gradients, step by step, and must stay within float64 rtol 1e-12 / float32 rtol 1e-5
of optax (one rounding per operation apart: optax applies Lion's weight decay as
``-lr * (sign + wd * p)``, fastopt as ``p * (1 - lr * wd) - lr * sign``).

Lion is ``optax.lion`` itself. Yogi: ``optax.yogi`` bias-corrects both moments, fastopt.Yogi's
default is the paper's update without bias correction; ``yogi_optax*`` (``bias_correction=True``)
are ``optax.scale_by_yogi`` itself, bias correction included; the ``yogi_default`` and
``yogi_wd_maximize`` references are the optax chain with fastopt's documented semantics
(``add_decayed_weights`` for the L2 term, optax's Yogi moments from ``initial_accumulator_value``
without the bias correction, ``scale_by_learning_rate``), and ``yogi_nobias`` (b1 = b2 = 0, where
optax's bias correction is the identity) is ``optax.yogi`` unmodified.
"""

import json
import pathlib

import numpy as np
import pytest

import fastopt as fo

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "optax_yogi_lion.npz"
TOL = {np.float64: dict(rtol=1e-12, atol=1e-14), np.float32: dict(rtol=1e-5, atol=1e-6)}
CLASSES = {"yogi": fo.Yogi, "lion": fo.Lion}


def _load():
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


DATA = _load()
CASES = sorted({k.split("/")[0] for k in DATA if k != "versions"})


def test_fixture_covers_both_algorithms_flags_and_dtypes():
    algorithms = {str(DATA[f"{c}/algorithm"]) for c in CASES}
    assert algorithms == {"yogi", "lion"}
    for algorithm in algorithms:
        kwargs = [json.loads(str(DATA[f"{c}/kwargs"])) for c in CASES]
        kwargs = [kw for c, kw in zip(CASES, kwargs) if str(DATA[f"{c}/algorithm"]) == algorithm]
        assert any(kw.get("weight_decay", 0) > 0 and kw.get("maximize") for kw in kwargs)
        assert any(not kw for kw in kwargs)  # the defaults
    for c in CASES:
        for dt in ("float32", "float64"):
            assert DATA[f"{c}/{dt}/params"].dtype == np.dtype(dt)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES)
def test_matches_optax_every_step(case, dtype):
    key = f"{case}/{np.dtype(dtype).name}"
    params0, grads, expected = (DATA[f"{key}/{n}"] for n in ("params0", "grads", "params"))
    kwargs = json.loads(str(DATA[f"{case}/kwargs"]))
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    p = params0.copy()
    opt = CLASSES[str(DATA[f"{case}/algorithm"])]([p], **kwargs)
    for k in range(grads.shape[0]):
        opt.step([grads[k].copy()])
        assert p.dtype == dtype
        np.testing.assert_allclose(
            p, expected[k], err_msg=f"{key} after step {k + 1}", **TOL[dtype]
        )
    # The run must move every parameter (a trajectory that stays put proves nothing).
    assert np.min(np.abs(p - params0)) > 0
