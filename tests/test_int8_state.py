"""8-bit blockwise optimizer state (``state_dtype="int8"``, kernels/block_loops.py).

Against bitsandbytes' ``Adam8bit``/``AdamW8bit`` on CPU torch tensors (the oracle: required when
FASTOPT_REQUIRE_ORACLE=1), the quantizer against ``storage.quantize`` (itself bit-exact with
bitsandbytes' dQuantize), thread-count independence, refusals with nothing written, state_dict
and checkpoint round trips, bfloat16 parameters. The arrays hold 2 x 16384 elements, so every
test runs the same parallel kernel (two compiled variants in all: float32 and bfloat16
parameters).
"""

import warnings

import ml_dtypes
import numba
import numpy as np
import pytest
from numba import njit
from oracle import import_or_skip

import fastopt as fo
from fastopt import checkpoint, dispatch, memory
from fastopt.kernels import block_loops
from fastopt.kernels.access import Storage
from fastopt.kernels.storage import DYNAMIC_MAP_SIGNED, DYNAMIC_MAP_UNSIGNED, quantize
from fastopt.optim import OPTIMIZERS, precision

SHAPE = (2, 16384)
N = SHAPE[0] * SHAPE[1]


def grads(seed, steps, shape=SHAPE):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(steps)]


def start(seed=0, shape=SHAPE):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def snapshot(opt, w):
    """Bytes of the parameters and every state array (codes, absmax, float state)."""
    out = [w.tobytes()]
    for s in opt.state.values():
        for k in sorted(s):
            v = s[k]
            if isinstance(v, precision.Quantized):
                out += [v.codes.tobytes(), v.absmax.tobytes()]
            elif hasattr(v, "tobytes"):
                out.append(v.tobytes())
            else:
                out.append(repr(v).encode())
    return out


# ---------------------------------------------------------------------------------------------
# The quantizer.

_nearest = block_loops.helper("nearest_code")


@njit
def _codes(x, qm, lut, out):
    for i in range(x.size):
        out[i] = _nearest(x[i], qm, lut)


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_code_is_storage_quantize(signed):
    """The bucket lookup gives storage.quantize's code on every map entry, midpoint (tie), the
    float32 neighbours of each midpoint, the ends, and 10**5 values over many scales; in the
    signed map a negative value (or -0.0) never gets the zero code (bitsandbytes' sign rule).
    NaN is left out: it only occurs in blocks whose absmax is NaN, where codes do not matter."""
    table = DYNAMIC_MAP_SIGNED if signed else DYNAMIC_MAP_UNSIGNED
    mids = ((table[1:] + table[:-1]) * np.float32(0.5)).astype(np.float32)
    near = [np.nextafter(mids, np.float32(s)) for s in (np.inf, -np.inf)]
    ends = [-2.0, -1.0, -0.0, 0.0, 1.0, 2.0, 1e-30, -1e-30, 3e-10, -3e-10, np.inf, -np.inf]
    rng = np.random.default_rng(3)
    wide = rng.standard_normal(50_000) * np.exp(rng.uniform(-30, 0, 50_000))
    x = np.concatenate([table, mids, *near, ends, rng.uniform(-1.01, 1.01, 50_000), wide]).astype(
        np.float32
    )
    got = np.empty(x.size, np.uint8)
    _codes(x, *block_loops.tables(signed), got)
    expected = np.array([quantize(v, table) for v in x], np.uint8)
    if signed:
        expected[(expected == 127) & np.signbit(x) & ~np.isnan(x)] = 126
    np.testing.assert_array_equal(got, expected)


def test_filled_slot_is_exact():
    """Initial state (Adagrad's initial_accumulator_value, Yogi's 1e-6) dequantizes exactly."""
    backend = dispatch.get_backend("numba-cpu")
    for signed, fill in ((False, 0.1), (True, 0.25), (False, 0.0)):
        slot = precision.int8_zeros(backend, 5000, precision.Int8Slot(signed), fill)
        assert slot.absmax.shape == (20,) and slot.codes.dtype == np.uint8
        assert np.all(slot.dequantized() == np.float32(fill))


# ---------------------------------------------------------------------------------------------
# bitsandbytes.


def bnb_or_skip():
    with warnings.catch_warnings():  # its import triggers torch.jit deprecation warnings
        warnings.simplefilter("ignore", DeprecationWarning)
        return import_or_skip("bitsandbytes")


def quant_step(values, absmax, signed):
    """Per element, one quantization step at ``values``: the larger gap between its map entry
    and the neighbours, plus 2/65535 (the resolution of bitsandbytes' CPU quantizer, a
    65536-entry table over [-1, 1]), times the block absmax (and 1e-3 for the two runs'
    absmax, equal to a few ulps)."""
    table = DYNAMIC_MAP_SIGNED if signed else DYNAMIC_MAP_UNSIGNED
    scale = np.repeat(absmax, 256)[: values.size]
    xn = np.divide(values, scale, out=np.zeros_like(values), where=scale > 0)
    c = np.clip(np.searchsorted(table, xn), 1, 254)
    gap = np.maximum(table[c + 1] - table[c], table[c] - table[c - 1])
    return (gap + 2 / 65535) * scale * 1.001


def bnb_state(opt, p):
    """bitsandbytes' state of ``p`` as a fastopt Adam state_dict entry."""
    st = opt.state[p]
    out = {"step": int(st["step"])}
    for name, k, qmap in (("exp_avg", 1, "signed"), ("exp_avg_sq", 2, "unsigned")):
        out[name] = st[f"state{k}"].numpy().copy()
        out[name + "_absmax"] = st[f"absmax{k}"].numpy().copy()
        out[name + "_qmap"] = qmap
    return out


@pytest.mark.oracle
def test_state_within_one_quantization_step_of_adamw8bit():
    """From bitsandbytes' own state (loaded into fastopt), one AdamW step each: the dequantized
    moments agree within one quantization step, the block absmax and parameters closely."""
    bnb = bnb_or_skip()
    torch = import_or_skip("torch")
    w = start(1)
    p = torch.nn.Parameter(torch.from_numpy(w.copy()))
    ref = bnb.optim.AdamW8bit([p], lr=1e-2, weight_decay=0.1)
    opt = fo.AdamW([w], lr=1e-2, weight_decay=0.1, state_dtype="int8")
    for g in grads(2, 4):
        p.grad = torch.from_numpy(g.copy())
        if ref.state:  # sync: fastopt starts from bitsandbytes' state and parameters
            sd = opt.state_dict()
            sd["state"] = {0: bnb_state(ref, p)}
            opt.load_state_dict(sd)
            w[...] = p.detach().numpy()
        ref.step()
        opt.step([g])
        np.testing.assert_allclose(w, p.detach().numpy(), rtol=0, atol=1e-5)
        theirs = bnb_state(ref, p)
        for name in ("exp_avg", "exp_avg_sq"):
            slot = opt.state[0][name]
            np.testing.assert_allclose(slot.absmax, theirs[name + "_absmax"], rtol=1e-5)
            other = precision.Quantized(
                theirs[name].reshape(-1), theirs[name + "_absmax"], slot.signed
            ).dequantized()
            tol = quant_step(other, slot.absmax, slot.signed)
            assert np.all(np.abs(slot.dequantized() - other) <= tol), name


@pytest.mark.oracle
def test_parameters_close_to_adam8bit_after_100_steps():
    """Independent runs from the same start with the same gradients: after 100 steps the
    parameters stay within 2e-3 of bitsandbytes' (each moved by up to ~0.04), nearer to them
    than to float32-state Adam's."""
    bnb = bnb_or_skip()
    torch = import_or_skip("torch")
    w = start(4)
    w0, f32 = w.copy(), w.copy()
    p = torch.nn.Parameter(torch.from_numpy(w.copy()))
    ref = bnb.optim.Adam8bit([p], lr=1e-3)
    opt = fo.Adam([w], lr=1e-3, state_dtype="int8")
    full = fo.Adam([f32], lr=1e-3)
    for g in grads(5, 100):
        p.grad = torch.from_numpy(g.copy())
        ref.step()
        opt.step([g])
        full.step([g])
    theirs = p.detach().numpy()
    diff = np.abs(w - theirs)
    assert np.abs(f32 - w0).max() > 0.03
    assert diff.max() < 2e-3 and diff.mean() < np.abs(f32 - theirs).mean()
    assert memory.state_bytes_per_parameter(opt) == 2 + 2 * 4 / 256
    assert memory.state_bytes_per_parameter(full) == 8


# ---------------------------------------------------------------------------------------------
# Determinism, non-finite values, parameters in bfloat16, small units.


def test_one_and_two_threads_give_identical_bits():
    """A partial last block and a NaN gradient element included."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one Numba thread available")
    n = N - 100
    gs = grads(6, 3, (n,))
    gs[2][5000] = np.nan
    runs = []
    before = numba.get_num_threads()
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            w = start(7, (n,))
            opt = fo.Adam([w], lr=1e-2, state_dtype="int8")
            for g in gs:
                opt.step([g])
            runs.append(snapshot(opt, w))
    finally:
        numba.set_num_threads(before)
    assert runs[0] == runs[1]
    # the NaN propagates through its block (and the parameter), as for every state dtype
    slot = opt.state[0]["exp_avg"]
    assert np.isnan(slot.absmax[5000 // 256]) and np.isnan(w[5000])
    assert np.isfinite(np.delete(slot.absmax, 5000 // 256)).all()


def test_skip_nonfinite_leaves_int8_state_untouched():
    w = start(8)
    opt = fo.Adam([w], lr=1e-2, state_dtype="int8", skip_nonfinite=True)
    opt.step([grads(9, 1)[0]])
    before = snapshot(opt, w)
    g = grads(10, 1)[0]
    g[0, 3] = np.inf
    opt.step([g])
    assert opt.skipped_steps == 1 and snapshot(opt, w) == before


def test_bfloat16_parameters_with_master_weights_follow_the_float32_run():
    """bf16 parameters, float32 master copy, int8 state: the master copy and the state are
    bit-identical to a float32-parameter run from the same (bf16-representable) start, and the
    bf16 parameters are the master copy rounded to nearest."""
    start32 = start(11).astype(ml_dtypes.bfloat16).astype(np.float32)
    w16 = start32.astype(ml_dtypes.bfloat16)
    w32 = start32.copy()
    opt16 = fo.AdamW([w16], lr=1e-2, state_dtype="int8", master_weights=True)
    opt32 = fo.AdamW([w32], lr=1e-2, state_dtype="int8")
    for g in grads(12, 3):
        opt16.step([g])
        opt32.step([g])
    s16, s32 = opt16.state[0], opt32.state[0]
    np.testing.assert_array_equal(s16[precision.MASTER], w32.reshape(-1))
    for name in ("exp_avg", "exp_avg_sq"):
        np.testing.assert_array_equal(s16[name].codes, s32[name].codes)
        np.testing.assert_array_equal(s16[name].absmax, s32[name].absmax)
    np.testing.assert_array_equal(w16, w32.astype(ml_dtypes.bfloat16))


def test_small_units_keep_float32_state():
    w = np.ones(precision.MIN_8BIT_SIZE - 1, np.float32)
    opt = fo.Adam([w], lr=1e-2, state_dtype="int8")
    opt.step([np.ones_like(w)])
    assert opt.state[0]["exp_avg"].dtype == np.float32


# ---------------------------------------------------------------------------------------------
# state_dict and checkpoints.


def test_state_dict_and_checkpoint_round_trip(tmp_path):
    w = start(13)
    opt = fo.Adam([w], lr=1e-2, state_dtype="int8")
    gs = grads(14, 3)
    opt.step([gs[0]])
    sd = opt.state_dict()
    entry = sd["state"][0]
    assert entry["exp_avg"].shape == SHAPE and entry["exp_avg"].dtype == np.uint8
    assert entry["exp_avg_sq_absmax"].shape == (N // 256,)
    assert (entry["exp_avg_qmap"], entry["exp_avg_sq_qmap"]) == ("signed", "unsigned")
    path = checkpoint.save(tmp_path / "ckpt", params={"w": w}, optimizer=opt)
    copies = []
    for source in ("state_dict", "checkpoint"):
        w2 = w.copy()
        other = fo.Adam([w2], lr=1e-2, state_dtype="int8")
        if source == "state_dict":
            other.load_state_dict(sd)
        else:
            checkpoint.load(path).restore(optimizer=other)
        copies.append((other, w2))
    for g in gs[1:]:
        opt.step([g])
        for other, _ in copies:
            other.step([g])
    for other, w2 in copies:
        assert snapshot(other, w2) == snapshot(opt, w)


def _bad(entry, **changes):
    out = dict(entry)
    out.update(changes)
    return out


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (lambda e: _bad(e, exp_avg_absmax=np.zeros(7, np.float32)), ValueError, "block layout"),
        (
            lambda e: _bad(e, exp_avg_absmax=e["exp_avg_absmax"].astype(np.float64)),
            ValueError,
            "must be float32",
        ),
        (lambda e: _bad(e, exp_avg_qmap="unsigned"), ValueError, "'signed' dynamic map"),
        (lambda e: _bad(e, exp_avg=e["exp_avg"].astype(np.float32)), TypeError, "uint8"),
        (lambda e: _bad(e, exp_avg_absmax=-e["exp_avg_absmax"] - 1), ValueError, "negative"),
        (lambda e: {k: v for k, v in e.items() if k != "exp_avg_qmap"}, ValueError, "needs"),
    ],
)
def test_mismatched_loaded_state_is_refused_before_writing(change, exc, match):
    w = start(15)
    opt = fo.Adam([w], lr=1e-2, state_dtype="int8")
    opt.step([grads(16, 1)[0]])
    sd = opt.state_dict()
    sd["state"] = {0: change(sd["state"][0])}
    before = snapshot(opt, w)
    with pytest.raises(exc, match=match):
        opt.load_state_dict(sd)
    assert snapshot(opt, w) == before


# ---------------------------------------------------------------------------------------------
# Refusals at construction and before the first write.


@pytest.mark.parametrize(
    "name,kwargs,reason",
    [
        ("rprop", {}, "previous gradient"),
        ("asgd", {}, "average of the parameters"),
        ("sgd", {}, "no state"),
        ("adafactor", {}, r"m \+ n values"),
        ("adamwschedulefree", {}, "schedule-free"),
        ("sgdschedulefree", {}, "schedule-free"),
    ],
)
def test_rules_without_moments_are_refused_by_name(name, kwargs, reason):
    cls = OPTIMIZERS[name]
    with pytest.raises(ValueError, match=f"{cls.__name__} .*state_dtype='int8': .*{reason}"):
        cls([np.ones(N, np.float32)], state_dtype="int8", **kwargs)


def test_every_moment_rule_declares_its_maps():
    """Each optimizer whose rules take int8 state builds with it, every slot mapped."""
    variants = {
        "sgd": [dict(lr=0.1, momentum=0.9)],
        "adam": [{}, dict(amsgrad=True)],
        "rmsprop": [dict(momentum=m, centered=c) for m in (0.0, 0.9) for c in (False, True)],
    }
    seen = set()
    w = np.ones(N, np.float32)
    for name, cls in OPTIMIZERS.items():
        for kwargs in variants.get(name, [{}]):
            arr = w.reshape(64, -1) if getattr(cls, "matrices_only", False) else w
            try:
                opt = cls([arr], state_dtype="int8", **kwargs)
            except (ValueError, TypeError) as exc:  # refused (LBFGS takes no precision options)
                assert "state_dtype" in str(exc), (name, exc)
                continue
            group = opt.param_groups[0]
            staged = opt.algorithm in precision.STAGED_INT8_RULES  # Muon's rule is "ema"
            seen.add(opt.algorithm if staged else opt._rule(group))
            slots = precision.slot_dtypes(opt.precision, arr, opt._state_names(group))
            assert all(precision.is_quantized(s) for s in slots.values()), name
    assert seen == set(precision.INT8_RULES) | precision.STAGED_INT8_RULES


def test_settings_changed_to_a_rule_without_state_are_refused_before_writing():
    w = start(17)
    opt = fo.SGD([w], lr=0.1, momentum=0.9, state_dtype="int8")
    opt.param_groups[0]["momentum"] = 0.0
    with pytest.raises(ValueError, match="SGD without momentum"):
        opt.step([grads(18, 1)[0]])
    assert np.array_equal(w, start(17)) and not opt.state


class _GPUBackend:
    name = "cupy"
    storage_names = ("float32", "float64", "bfloat16", "float16")
    mixed_storage = True


class _NoInt8Backend(_GPUBackend):
    name = "numpy"


def test_backends_without_int8_kernels_are_refused():
    w = np.ones(N, np.float32)
    with pytest.raises(TypeError, match="backend 'numpy' cannot keep 8-bit blockwise state"):
        fo.Adam([w], backend="numpy", state_dtype="int8")
    storage = Storage("float32", "float32", "int8", False, False)
    with pytest.raises(TypeError, match="w: backend 'numpy' cannot keep 8-bit blockwise state"):
        precision.check_backend_stores(_NoInt8Backend(), storage, "w")
    precision.check_backend_stores(_GPUBackend(), storage, "w")  # CuPy has block kernels


def test_bad_state_dtype_names_int8():
    with pytest.raises(ValueError, match="or 'int8' for 8-bit blockwise state"):
        fo.Adam([np.ones(3, np.float32)], state_dtype="uint8")
