"""16-bit storage, state_dtype, master weights and stochastic rounding for the rules that are not
elementwise (LAMB, LARS, NovoGrad, Adafactor, Muon; ``fastopt/optim/staging.py``).

The oracle is the spec of the precision issue written out in NumPy: the float32 optimizer run on
the widened stored values, every stored value rounded after each step (to nearest even by
ml_dtypes' casts, or stochastically by the pure-Python helpers of ``kernels/storage.py`` with the
(seed, step, element index, word) counter), bit for bit.
"""

import ml_dtypes
import numba
import numpy as np
import pytest
from oracle import import_or_skip

import fastopt as fo
from fastopt.checkpoint import load, save
from fastopt.kernels import storage as st

BF16 = ml_dtypes.bfloat16
RULES = {
    "lamb": (fo.LAMB, dict(lr=1e-2, weight_decay=0.01)),
    "lars": (fo.LARS, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "novograd": (fo.NovoGrad, dict(lr=1e-2, weight_decay=1e-3)),
    "adafactor": (fo.Adafactor, dict(lr=1e-2, eps=(1e-3, 1e-3), weight_decay=0.01)),
    "muon": (fo.Muon, dict(lr=1e-2, weight_decay=0.01)),
}
SHAPES = {  # Muon takes 2-D parameters only; Adafactor a batch of matrices too
    "lamb": {"w": (24, 20), "b": (20,), "big": (200, 180)},
    "lars": {"w": (24, 20), "b": (20,), "big": (200, 180)},
    "novograd": {"w": (24, 20), "b": (20,), "big": (200, 180)},
    "adafactor": {"w": (24, 20), "b": (20,), "t": (3, 30, 40)},
    "muon": {"w": (24, 20), "big": (120, 90)},
}


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint16)


def _round_rne(x, dtype):
    return x.astype(dtype).astype(np.float32)


def _round_sr(x, dtype, seed, step, index0, word):
    """Stochastic rounding of float32 ``x`` to ``dtype`` with word ``word`` of
    random_bits4(seed, step, index0 + i): kernels/storage.py's pure-Python helpers."""
    to16 = st.f32_to_bf16_sr if dtype == BF16 else st.f32_to_f16_sr
    flat = x.reshape(-1)
    out = np.empty(flat.size, np.uint16)
    for i, v in enumerate(flat):
        out[i] = to16(np.float32(v), st.random_bits4(seed, step, index0 + i)[word])
    return out.view(dtype).astype(np.float32).reshape(x.shape)


def step(opt, ps, grads):
    """One step of ``opt`` over the ParamSet ``ps`` with ``grads`` (name -> array)."""
    for k in grads:
        ps.grads[k][...] = grads[k]
    opt.step()


def _grads(rng, shapes, dtype):
    return {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}


def _oracle_round(opt32, params32, dtype, master, stochastic, seed, step, state_dtype):
    """After a float32 step: what the stored values are, as floats. The oracle runs over a
    ParamSet (one unit, element index 0 at its first element)."""
    (unit,) = opt32.units()
    if not master:
        p = unit.param
        p[...] = _round_sr(p, dtype, seed, step, 0, 0) if stochastic else _round_rne(p, dtype)
    sd = state_dtype if state_dtype is not None else (None if master else dtype)
    if sd is None or np.dtype(sd) == np.float32:
        return
    arrays = [(k, v) for k, v in unit.state.items() if hasattr(v, "dtype")]
    for j, (_, a) in enumerate(arrays):
        flat = a.reshape(-1)
        if stochastic:
            flat[...] = _round_sr(flat, sd, seed, step, 0, 1 + j % 3)
        else:
            flat[...] = _round_rne(flat, sd)


SMALL = {"w": (24, 20), "b": (20,)}
SMALL_2D = {"w": (24, 20), "v": (10, 12)}


def _run(
    rule, dtype, master, stochastic=False, state_dtype=None, steps=3, seed=7, grad=None,
    shapes=None, oracle=True,
):  # fmt: skip
    cls, kw = RULES[rule]
    shapes = shapes or SHAPES[rule]
    rng = np.random.default_rng(5)
    init = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    ps = fo.ParamSet(init, dtype=dtype)
    options = dict(master_weights=master, stochastic_rounding=stochastic, seed=seed)
    opt = cls(ps, state_dtype=state_dtype, **options, **kw)
    ps32 = fo.ParamSet({k: v.astype(np.float32) for k, v in init.items()})
    opt32 = cls(ps32, **kw)
    for t in range(1, steps + 1):
        g = _grads(rng, shapes, grad or dtype)
        for k in shapes:
            ps.grads[k][...] = g[k]
            ps32.grads[k][...] = g[k].astype(np.float32)
        opt.step()
        if oracle:
            opt32.step()
            _oracle_round(opt32, ps32.flat, dtype, master, stochastic, seed, t, state_dtype)
    return ps, ps32, opt, opt32


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("dtype", [BF16, np.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("master", [False, True], ids=["rounded", "master"])
def test_16bit_step_is_the_float32_step_rounded_on_store(rule, dtype, master):
    ps, ps32, opt, opt32 = _run(rule, dtype, master)
    assert np.array_equal(_bits(ps.flat), _bits(ps32.flat.astype(dtype)))
    (unit,), (unit32,) = opt.units(), opt32.units()
    if master:
        assert np.array_equal(unit.state["master_param"], ps32.flat)
    for k, v in unit32.state.items():
        if hasattr(v, "dtype"):
            kept = unit.state[k]
            assert kept.dtype == (np.float32 if master else dtype), k
            assert np.array_equal(kept.astype(np.float32), v, equal_nan=True), k


@pytest.mark.parametrize("rule", sorted(RULES))
def test_stochastic_rounding_uses_the_counter_of_the_storage_loops(rule):
    """Parameter word 0, state array j word 1 + j, of random_bits4(seed, step, index)."""
    small = SMALL_2D if rule == "muon" else SMALL
    ps, ps32, opt, _ = _run(rule, BF16, master=False, stochastic=True, steps=2, shapes=small)
    assert np.array_equal(_bits(ps.flat), _bits(ps32.flat.astype(BF16)))
    again = _run(rule, BF16, False, stochastic=True, steps=2, shapes=small, oracle=False)[0]
    assert np.array_equal(_bits(again.flat), _bits(ps.flat))
    other = _run(rule, BF16, False, True, steps=2, seed=8, shapes=small, oracle=False)[0]
    assert not np.array_equal(_bits(other.flat), _bits(ps.flat))


@pytest.mark.parametrize("rule", sorted(RULES))
def test_bfloat16_state_of_float32_parameters(rule):
    ps, ps32, opt, _ = _run(rule, np.float32, master=False, state_dtype="bfloat16")
    assert np.array_equal(ps.flat, ps32.flat)
    (unit,) = opt.units()
    assert all(v.dtype == BF16 for k, v in unit.state.items() if hasattr(v, "dtype"))


@pytest.mark.parametrize("rule", sorted(RULES))
def test_bfloat16_gradients_of_float32_parameters(rule):
    ps, ps32, _, _ = _run(rule, np.float32, master=False, grad=BF16)
    assert np.array_equal(ps.flat, ps32.flat)


@pytest.mark.parametrize("rule", ["lamb", "adafactor", "muon"])
def test_threads_do_not_change_the_bits(rule):
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = _run(rule, BF16, master=False, stochastic=True, steps=2, oracle=False)[0]
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = _run(rule, BF16, master=False, stochastic=True, steps=2, oracle=False)[0]
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(_bits(one.flat), _bits(two.flat))


@pytest.mark.parametrize("rule", sorted(RULES))
def test_list_of_arrays_equals_the_paramset(rule):
    """Plain 16-bit arrays (one unit each, their own element offsets) step like the ParamSet
    of the same arrays under rounding to nearest."""
    cls, kw = RULES[rule]
    rng = np.random.default_rng(1)
    init = {k: rng.standard_normal(s).astype(BF16) for k, s in SHAPES[rule].items()}
    arrays = {k: v.copy() for k, v in init.items()}
    ps = fo.ParamSet(init, dtype=BF16)
    a = cls(arrays, master_weights=True, **kw)
    b = cls(ps, master_weights=True, **kw)
    for _ in range(3):
        g = _grads(rng, SHAPES[rule], BF16)
        a.step(g)
        for k in g:
            ps.grads[k][...] = g[k]
        b.step()
    for k in init:
        assert np.array_equal(_bits(arrays[k]), _bits(ps[k])), k


@pytest.mark.parametrize("rule", sorted(RULES))
def test_checkpoint_resume_continues_bit_for_bit(rule, tmp_path):
    """bf16 parameters with master weights and bfloat16 state: state_dict through a checkpoint
    file into a new optimizer, then the same steps as the optimizer that went on."""
    cls, kw = RULES[rule]
    shapes = SHAPES[rule]
    rng = np.random.default_rng(2)
    init = {k: rng.standard_normal(s).astype(BF16) for k, s in shapes.items()}
    options = dict(master_weights=True, state_dtype="bfloat16", **kw)
    ps = fo.ParamSet(init, dtype=BF16)
    opt = cls(ps, **options)
    grads = [_grads(rng, shapes, BF16) for _ in range(4)]

    for g in grads[:2]:
        step(opt, ps, g)
    save(tmp_path / "ckpt", params=ps, optimizer=opt)
    ck = load(tmp_path / "ckpt")
    ps2 = fo.ParamSet({k: ck.params[k] for k in shapes}, dtype=BF16)
    opt2 = cls(ps2, **options)
    ck.restore(optimizer=opt2)
    for g in grads[2:]:
        step(opt, ps, g)
        step(opt2, ps2, g)
    assert np.array_equal(_bits(ps.flat), _bits(ps2.flat))
    (u,), (u2,) = opt.units(), opt2.units()
    for k, v in u.state.items():
        if hasattr(v, "dtype"):
            assert v.dtype == u2.state[k].dtype, k
            assert np.array_equal(np.asarray(v, np.float32), np.asarray(u2.state[k], np.float32)), k


INT8 = ["lamb", "lars", "novograd", "muon"]


@pytest.mark.parametrize("rule", INT8)
@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["f32", "bf16-master"])
def test_int8_state_is_the_float32_step_requantized(rule, dtype):
    """state_dtype="int8": each step dequantizes the 8-bit slots, runs the float32 step and
    requantizes each block (its new absmax, the nearest codes): the oracle is the float32
    optimizer whose state is replaced after each step by its 8-bit image
    (``precision.int8_from_values``, the host quantizer, then dequantized)."""
    from fastopt.optim import precision

    cls, kw = RULES[rule]
    shapes = SHAPES[rule]
    rng = np.random.default_rng(4)
    init = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    ps = fo.ParamSet(init, dtype=dtype)
    opt = cls(ps, state_dtype="int8", master_weights=dtype == BF16, **kw)
    ps32 = fo.ParamSet({k: v.astype(np.float32) for k, v in init.items()})
    opt32 = cls(ps32, **kw)
    for _ in range(3):
        g = _grads(rng, shapes, dtype)
        for k in shapes:
            ps.grads[k][...] = g[k]
            ps32.grads[k][...] = g[k].astype(np.float32)
        opt.step()
        opt32.step()
        (unit32,) = opt32.units()
        for name, a in unit32.state.items():
            if name in precision.INT8_SIGNED and a.size == ps32.size:
                q = precision.int8_from_values(a, precision.INT8_SIGNED[name])
                a[...] = q.dequantized()
    (unit,), (unit32,) = opt.units(), opt32.units()
    quantized = [k for k, v in unit.state.items() if isinstance(v, precision.Quantized)]
    assert quantized and set(quantized) <= set(precision.INT8_SIGNED)
    for k in quantized:
        assert np.array_equal(unit.state[k].dequantized(), unit32.state[k]), k
    if dtype == BF16:
        assert np.array_equal(unit.state["master_param"], ps32.flat)
        assert np.array_equal(_bits(ps.flat), _bits(ps32.flat.astype(BF16)))
    else:
        assert np.array_equal(ps.flat, ps32.flat)


@pytest.mark.parametrize("rule", INT8)
def test_int8_state_round_trips_through_a_checkpoint(rule, tmp_path):
    cls, kw = RULES[rule]
    shapes = SHAPES[rule]
    rng = np.random.default_rng(6)
    init = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    ps = fo.ParamSet(init)
    opt = cls(ps, state_dtype="int8", **kw)
    grads = [_grads(rng, shapes, np.float32) for _ in range(4)]
    for g in grads[:2]:
        ps.grad_flat[...] = fo.ParamSet(g).flat
        opt.step()
    save(tmp_path / "ckpt", params=ps, optimizer=opt)
    ck = load(tmp_path / "ckpt")
    ps2 = fo.ParamSet({k: ck.params[k] for k in shapes})
    opt2 = cls(ps2, state_dtype="int8", **kw)
    ck.restore(optimizer=opt2)
    for g in grads[2:]:
        for p, o in ((ps, opt), (ps2, opt2)):
            p.grad_flat[...] = fo.ParamSet(g).flat
            o.step()
    assert np.array_equal(ps.flat, ps2.flat)


def test_int8_state_is_refused_for_adafactor_with_the_reason():
    with pytest.raises(ValueError, match=r"Adafactor .*cannot keep state_dtype='int8'.*m \+ n"):
        fo.Adafactor([np.ones((300, 300), np.float32)], state_dtype="int8")


@pytest.mark.parametrize("rule", ["lamb", "lars", "novograd", "adafactor"])
def test_reference_backend_refuses_16bit_storage_before_any_write(rule):
    cls, kw = RULES[rule]
    with pytest.raises(TypeError, match="backend 'numpy' stores float32, float64 parameters"):
        cls([np.ones((4, 5), BF16)], backend="numpy", **kw)
    w = np.ones((4, 5), np.float32)
    opt = cls([w], backend="numpy", **kw)
    with pytest.raises(TypeError, match="backend 'numpy' needs gradients of the parameter's dtype"):
        opt.step([np.ones((4, 5), BF16)])
    assert np.all(w == 1) and not opt.state_dict()["state"]


def test_nonfinite_16bit_gradient_is_skipped_with_nothing_written():
    w = np.ones((30, 20), BF16)
    opt = fo.LAMB([w], master_weights=True, skip_nonfinite=True)
    g = np.ones((30, 20), BF16)
    g[3, 4] = np.inf
    opt.step([g])
    assert np.all(w.astype(np.float32) == 1) and opt.skipped_steps == 1


TRAIN = {  # optimizer class, learning rate, keyword arguments
    "lamb": (fo.LAMB, 3e-3, {}),
    "lars": (fo.LARS, 0.5, dict(momentum=0.9)),
    "novograd": (fo.NovoGrad, 1e-2, {}),
    "adafactor": (fo.Adafactor, 1e-2, {}),
    "muon": (fo.Muon, 0.02, dict(adamw_lr=1e-2)),
}


@pytest.mark.parametrize("rule", sorted(TRAIN))
def test_trainer_bf16_learns_digits(rule):
    """Trainer(precision="bf16"): bf16 parameters with float32 master weights (the Trainer's
    default), each new rule through its stages."""
    import_or_skip("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    model = fo.MLP(64, [64, 64], 10, seed=0)
    model.fit_standardizer(Xtr)
    cls, lr, kw = TRAIN[rule]
    trainer = fo.Trainer(
        model, cls, lr=lr, optimizer_kwargs=kw, batch_size=64, epochs=12, seed=0,
        progress=False, precision="bf16",
    )  # fmt: skip
    trainer.fit(Xtr, ytr)
    (unit,) = trainer.optimizer.units()
    assert unit.param.dtype == BF16 and unit.state["master_param"].dtype == np.float32
    accuracy = float(np.mean(model.predict(Xte).argmax(axis=1) == yte))
    assert accuracy >= 0.95, accuracy


@pytest.mark.parametrize("n", [0, 1, 1000, (1 << 15) + 3])  # serial and parallel loops
def test_cpu_convert_is_the_cast_and_the_stochastic_helpers(n):
    from fastopt.kernels import cpu_storage

    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 2.0 ** rng.integers(-30, 20, n)).astype(np.float32)
    x[: min(n, 6)] = [0.0, -0.0, np.inf, -np.inf, np.nan, 3 * 2.0**-134][: min(n, 6)]
    for dtype in (BF16, np.float16):
        out = np.empty(n, dtype)
        cpu_storage.convert(out, x)
        with np.errstate(over="ignore"):  # float16 overflows to inf, as the kernels round
            assert np.array_equal(_bits(out), _bits(x.astype(dtype)))
        back = np.empty(n, np.float32)
        cpu_storage.convert(back, out)
        assert np.array_equal(back, out.astype(np.float32), equal_nan=True)
        m = min(n, 300)  # the pure-Python oracle on the first elements
        cpu_storage.convert(out, x, (2**40 + 3, 9, 2**32 - 5), 2)
        want = _round_sr(x[:m], dtype, 2**40 + 3, 9, 2**32 - 5, 2)
        assert np.array_equal(out[:m].astype(np.float32), want, equal_nan=True)
    with pytest.raises(ValueError, match="word"):
        cpu_storage.convert(np.empty(n, BF16), x, (1, 1, 1), 4)


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("options", ["master", "sr-bf16-state"])
def test_state_dict_in_any_key_order_continues_bit_for_bit(rule, options):
    """A state_dict whose arrays are listed in another order (sorted, as ZeRO gathers them;
    reversed) continues as the optimizer that went on: the random-bit words follow the rule's
    slots. With master weights NovoGrad's per-tensor moment stays float32 through the load."""
    cls, kw = RULES[rule]
    shapes = SMALL_2D if rule == "muon" else SMALL
    opts = (
        dict(master_weights=True)
        if options == "master"
        else dict(stochastic_rounding=True, seed=9, state_dtype="bfloat16")
    )
    rng = np.random.default_rng(8)
    init = {k: rng.standard_normal(s).astype(BF16) for k, s in shapes.items()}
    grads = [_grads(rng, shapes, BF16) for _ in range(4)]
    ps = fo.ParamSet(init, dtype=BF16)
    opt = cls(ps, **opts, **kw)

    for g in grads[:2]:
        step(opt, ps, g)
    sd = opt.state_dict()
    ends = []
    for order in (sorted, lambda keys: list(reversed(list(keys)))):
        entry = sd["state"][0]
        moved = {**sd, "state": {0: {k: entry[k] for k in order(entry)}}}
        ps2 = fo.ParamSet({k: np.asarray(ps[k]).copy() for k in shapes}, dtype=BF16)
        opt2 = cls(ps2, **opts, **kw)
        opt2.load_state_dict(moved)
        (u,), (u2,) = opt.units(), opt2.units()
        for k, v in u.state.items():
            if hasattr(v, "dtype"):
                assert u2.state[k].dtype == v.dtype, k
        for g in grads[2:]:
            step(opt2, ps2, g)
        ends.append(_bits(ps2.flat).copy())
    for g in grads[2:]:
        step(opt, ps, g)
    for end in ends:
        assert np.array_equal(end, _bits(ps.flat))


@pytest.mark.parametrize(
    "name,dtype,options",
    [
        ("NovoGrad", np.float32, {"state_dtype": "bfloat16"}),
        ("Adafactor", np.float32, {"state_dtype": "bfloat16"}),
        ("Adafactor", ml_dtypes.bfloat16, {}),
    ],
)
def test_stochastic_rounding_of_per_tensor_state_is_the_same_for_a_list_and_a_paramset(
    name, dtype, options
):
    """Per-tensor state (NovoGrad's second moment, Adafactor's factors) is rounded with the
    random bits of its place in the ParamSet's layout of that array, for a list of the same
    arrays too (its units' shares counted in order), not with the unit's parameter offset."""
    shapes = [(7, 5), (13,), (9, 6)]
    rng = np.random.default_rng(0)
    init = [rng.standard_normal(s).astype(np.float32).astype(dtype) for s in shapes]
    grads = [
        [rng.standard_normal(s).astype(np.float32).astype(dtype) for s in shapes] for _ in range(4)
    ]
    kw = {"stochastic_rounding": True, "seed": 1, **options}
    arrays = [a.copy() for a in init]
    listed = getattr(fo, name)(arrays, **kw)
    ps = fo.ParamSet({f"p{i}": a.copy() for i, a in enumerate(init)})
    whole = getattr(fo, name)(ps, **kw)
    for step_grads in grads:
        listed.step(step_grads)
        for i, g in enumerate(step_grads):
            ps.grads[f"p{i}"][...] = g
        whole.step()
    for i, a in enumerate(arrays):
        assert np.array_equal(a.view(np.uint8), np.asarray(ps[f"p{i}"]).view(np.uint8)), i
