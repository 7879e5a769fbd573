"""Muon's bfloat16 iteration through torch's bfloat16 products (``newton_schulz_torch``, used on
CPUs with native bfloat16 matrix instructions): torch's ``_zeropower_via_newtonschulz`` bit for
bit, and whole Muon steps as close to torch.optim.Muon as shipped as float32 rounding allows.
Both run on any CPU (torch's bfloat16 products are only slower without those instructions)."""

import numpy as np
import pytest

import fastopt as fo
from fastopt.optim import muon as muon_module
from fastopt.optim.newton_schulz import NewtonSchulz
from fastopt.optim.newton_schulz_torch import TorchNewtonSchulz, native_bfloat16_products

torch = pytest.importorskip("torch")
from torch.optim._muon import _zeropower_via_newtonschulz  # noqa: E402

COEFFICIENTS = (3.4445, -4.775, 2.0315)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint32)


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (24, 24), (6, 4), (1, 5)])
@pytest.mark.parametrize("steps", [0, 1, 5])
def test_iteration_is_torchs_bit_for_bit(shape, steps):
    rng = np.random.default_rng(sum(shape) + steps)
    g = rng.standard_normal(shape).astype(np.float32)
    ns = TorchNewtonSchulz(shape)
    for scale in (1.0, 1e-30):  # the second: the norm clamped at eps
        out = ns.run(g * np.float32(scale), COEFFICIENTS, steps, 1e-7)
        ref = _zeropower_via_newtonschulz(torch.from_numpy(g * np.float32(scale)), COEFFICIENTS,
                                          steps, 1e-7)  # fmt: skip
        assert out.shape == shape and out.dtype == np.float32
        assert np.array_equal(_bits(out), _bits(ref.float().numpy()))


def test_input_other_than_the_scratch_is_only_read():
    g = np.random.default_rng(0).standard_normal((8, 5))  # float64, rounded like grad.bfloat16()
    before = g.copy()
    out = TorchNewtonSchulz(g.shape).run(g, COEFFICIENTS, 5, 1e-7)
    ref = _zeropower_via_newtonschulz(torch.from_numpy(g), COEFFICIENTS, 5, 1e-7)
    assert np.array_equal(g, before)
    assert np.array_equal(_bits(out), _bits(ref.float().numpy()))


@pytest.mark.parametrize("native", [True, False], ids=["torch-products", "emulated"])
def test_muon_picks_the_products_by_the_cpu(monkeypatch, native):
    monkeypatch.setattr(muon_module, "native_bfloat16_products", lambda: native)
    ps = fo.ParamSet({"w": np.ones((4, 3), np.float32)})
    opt = fo.Muon(ps, lr=0.02)
    opt.step()
    kinds = {type(ns) for k, ns in opt._scratch().items() if k[0] != "layout"}
    assert kinds == {TorchNewtonSchulz if native else NewtonSchulz}
    f32 = fo.Muon(fo.ParamSet({"w": np.ones((4, 3), np.float32)}), lr=0.02, ns_dtype="float32")
    f32.step()
    assert {type(ns) for k, ns in f32._scratch().items() if k[0] != "layout"} == {NewtonSchulz}


def test_native_products_are_told_by_torch():
    expected = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert native_bfloat16_products() == expected


def test_without_torch_the_iteration_is_emulated(monkeypatch):
    import importlib.util

    from fastopt.optim import newton_schulz_torch

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    native_bfloat16_products.cache_clear()
    try:
        assert newton_schulz_torch.native_bfloat16_products() is False
    finally:
        native_bfloat16_products.cache_clear()
