"""Muon's bfloat16 iteration through torch's bfloat16 products (``newton_schulz_torch``, used on
CPUs with native bfloat16 matrix instructions): torch's ``_zeropower_via_newtonschulz`` bit for
bit, and whole Muon steps as close to torch.optim.Muon as shipped as float32 rounding allows.
Both run on any CPU (torch's bfloat16 products are only slower without those instructions)."""

import numpy as np
import pytest
from oracle import import_or_skip

import fastopt as fo
from fastopt.optim import muon as muon_module
from fastopt.optim.newton_schulz import NewtonSchulz
from fastopt.optim.newton_schulz_torch import TorchNewtonSchulz, native_bfloat16_products

torch = import_or_skip("torch")
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


@pytest.mark.parametrize(
    "shape, transposed",
    [((150, 70), True), ((64, 64), True), ((65, 3), True), ((3, 1100), False), ((70, 150), False)],
)
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_update_from_bits_any_layout(shape, transposed, weight_decay):
    """The update from the iteration's bfloat16 bits, row-major or the transposed view of a
    tall matrix's result (read by tiles, partial ones included), equals the float32 update of
    the widened values bit for bit."""
    rng = np.random.default_rng(shape[0] * 7 + shape[1])
    values = rng.standard_normal(shape).astype(np.float32)
    stored = np.ascontiguousarray(values.T) if transposed else values
    bits = (stored.view(np.uint32) >> 16).astype(np.uint16)
    view = bits.T if transposed else bits
    assert view.shape == shape and view.flags.c_contiguous == (not transposed)
    p0 = rng.standard_normal(shape[0] * shape[1]).astype(np.float32)
    scale, wd = np.float32(0.02), np.float32(weight_decay)
    got = p0.copy()
    muon_module.apply_update_bits(got, view, scale, wd)
    want = p0.copy()
    widened = (view.astype(np.uint32) << 16).view(np.float32)
    muon_module.apply_update(want, np.ascontiguousarray(widened), scale, wd, False)
    assert np.array_equal(_bits(got), _bits(want))
