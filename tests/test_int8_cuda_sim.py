"""8-bit blockwise state (``state_dtype="int8"``) on numba-cuda (kernels/block_cuda.py) under the
Numba CUDA simulator, against the numba-cpu block loops (kernels/block_loops.py) bit for bit.

Run in its own process with the simulator switched on before numba is imported::

    NUMBA_ENABLE_CUDASIM=1 pytest tests/test_int8_cuda_sim.py -q -p no:cacheprovider

The simulator runs every CUDA thread as a Python thread and each element through the Python
rules (seconds per step at 4096 elements), so the optimizers take two steps; the full-size run
(4096 + 300 elements: a partial last block, a small unit beside it) covers Adam at the real
4096-element threshold; the other combinations (SGD with momentum, AdamW over bfloat16 parameters
with float32 master weights, ...) run at 556 elements with ``MIN_8BIT_SIZE`` lowered.
"""

import ml_dtypes
import numpy as np
import pytest

import fastopt as fo
from fastopt.kernels import cuda_launch
from fastopt.kernels.access import Storage
from fastopt.optim import precision

pytestmark = pytest.mark.skipif(
    not cuda_launch._simulating(),
    reason="CUDA simulator tests: run with NUMBA_ENABLE_CUDASIM=1 in their own process",
)

SMALL = 256 + 44  # a full block and a partial one (each simulated block costs seconds)
BF16 = np.dtype(ml_dtypes.bfloat16)


def _cuda():
    from numba import cuda

    return cuda


def to_device(a):
    """A numba device array holding ``a`` (bfloat16 through its bits, as numba cannot)."""
    cuda = _cuda()
    if a.dtype == BF16:
        return cuda.to_device(a.view(np.uint16)).view(BF16)
    return cuda.to_device(a)


def host(a):
    """The bits of a device (or host) array as a host array: uint16 for 16-bit floats."""
    a = a.view(np.uint16) if a.dtype.itemsize == 2 else a
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def assert_same_state(opt_d, opt_h):
    """Every state array of the two optimizers equal bit for bit (8-bit: codes and absmax)."""
    for key, sh in opt_h.state.items():
        sd = opt_d.state[key]
        assert sorted(sd) == sorted(sh)
        for name, vh in sh.items():
            vd = sd[name]
            if isinstance(vh, precision.Quantized):
                assert isinstance(vd, precision.Quantized) and vd.signed == vh.signed
                assert host(vd.codes).tobytes() == vh.codes.tobytes(), (key, name)
                assert host(vd.absmax).tobytes() == vh.absmax.tobytes(), (key, name)
            elif hasattr(vh, "dtype"):
                assert host(vd).tobytes() == host(vh).tobytes(), (key, name)
            else:
                assert vd == vh, (key, name)


def run_both(cls, kwargs, shapes, dtype=np.float32, steps=2, seed=0):
    """``cls`` over device arrays and over host arrays of the same values, ``steps`` steps of
    the same gradients; returns the two optimizers and parameter lists."""
    rng = np.random.default_rng(seed)
    hosts = [rng.standard_normal(s).astype(np.float32).astype(dtype) for s in shapes]
    devs = [to_device(a) for a in hosts]
    opt_d, opt_h = cls(devs, **kwargs), cls(hosts, **kwargs)
    assert opt_d._groups[0]["units"][0].backend.name == "numba-cuda"
    for _ in range(steps):
        grads = [rng.standard_normal(s).astype(np.float32).astype(dtype) for s in shapes]
        opt_h.step(grads)
        opt_d.step([to_device(g) for g in grads])
    for d, h in zip(devs, hosts):
        assert host(d).tobytes() == host(h).tobytes()
    assert_same_state(opt_d, opt_h)
    return opt_d, opt_h


FULL = [("adam", fo.Adam, dict(lr=1e-2), np.float32)]


@pytest.mark.parametrize("case", FULL, ids=[c[0] for c in FULL])
def test_units_above_and_below_the_threshold_match_numba_cpu_bit_for_bit(case, monkeypatch):
    """A unit above ``MIN_8BIT_SIZE`` (8-bit state, partial last block) and one below it
    (float32 state, as on the CPU). The threshold is lowered to 256: the device kernels never
    see it (the host decides per unit, as ``tests/test_int8_state.py`` checks at 4096), and the
    simulator runs each of a block's 256 threads as a Python thread (a 4096-element unit took
    a minute)."""
    monkeypatch.setattr(precision, "MIN_8BIT_SIZE", 256)
    _, cls, kwargs, dtype = case
    opt_d, _ = run_both(cls, dict(kwargs, state_dtype="int8"), [(SMALL,), (100,)], dtype)
    big, small = opt_d.state[0], opt_d.state[1]
    slot = big["momentum_buffer" if cls is fo.SGD else "exp_avg"]
    assert isinstance(slot, precision.Quantized) and slot.absmax.size == 2
    assert not any(isinstance(v, precision.Quantized) for v in small.values())


SMALL_CASES = [
    ("sgd-momentum", fo.SGD, dict(lr=0.05, momentum=0.9, nesterov=True), np.float32),
    ("adamw-bf16-master", fo.AdamW, dict(lr=1e-2, weight_decay=0.1, master_weights=True), BF16),
    ("amsgrad", fo.Adam, dict(lr=1e-2, amsgrad=True), np.float32),  # three slots
    ("adagrad-filled", fo.Adagrad, dict(lr=0.1, initial_accumulator_value=0.5), np.float32),
    ("adamw-bf16-sr", fo.AdamW, dict(lr=1e-2, stochastic_rounding=True, seed=5), BF16),
    ("adam-f64", fo.Adam, dict(lr=1e-2, weight_decay=0.01), np.float64),
]


@pytest.mark.parametrize("case", SMALL_CASES, ids=[c[0] for c in SMALL_CASES])
def test_other_combinations_match_numba_cpu_bit_for_bit(case, monkeypatch):
    monkeypatch.setattr(precision, "MIN_8BIT_SIZE", 256)
    _, cls, kwargs, dtype = case
    opt_d, _ = run_both(cls, dict(kwargs, state_dtype="int8"), [(SMALL,)], dtype, seed=3)
    assert any(isinstance(v, precision.Quantized) for v in opt_d.state[0].values())


def _adam_unit(monkeypatch):
    monkeypatch.setattr(precision, "MIN_8BIT_SIZE", 256)
    w = to_device(np.linspace(-1, 1, SMALL, dtype=np.float32))
    opt = fo.Adam([w], lr=1e-2, state_dtype="int8")
    opt.step([to_device(np.full(SMALL, 0.5, np.float32))])
    return w, opt


def snapshot(w, opt):
    s = opt.state[0]
    return [host(w).tobytes()] + [
        host(a).tobytes() for k in ("exp_avg", "exp_avg_sq") for a in s[k][:2]
    ]


def test_launch_configuration_does_not_change_the_bits(monkeypatch):
    """One element per thread (256 threads, one block per quantization block) and the
    simulator's default (few threads and blocks, block-stride) give the same bits."""
    from fastopt.kernels import block_cuda

    runs = []
    for launch in (block_cuda.SIMULATOR_LAUNCH, (3, 256)):
        monkeypatch.setattr(block_cuda, "SIMULATOR_LAUNCH", launch)
        w, opt = _adam_unit(monkeypatch)
        opt.step([to_device(np.linspace(2, -1, SMALL, dtype=np.float32))])
        runs.append(snapshot(w, opt))
    assert runs[0] == runs[1]


@pytest.mark.parametrize("threads", [1, 2])
def test_fewer_threads_than_state_slots_keep_each_blocks_absmax(threads, monkeypatch):
    """``threads`` may be any divisor of 256: with fewer threads than AMSGrad's three slots
    every slot's shared maximum is still reset for each quantization block (with 1 or 2
    threads the third slot's used to carry the previous block's maximum along)."""
    from fastopt.kernels import block_cuda

    monkeypatch.setattr(block_cuda, "SIMULATOR_LAUNCH", (1, threads))
    monkeypatch.setattr(precision, "MIN_8BIT_SIZE", 256)
    rng = np.random.default_rng(0)
    w = rng.standard_normal(3 * 256).astype(np.float32)
    scale = np.repeat(np.float32([100.0, 0.01, 1.0]), 256)  # blocks of very different sizes
    dw = to_device(w)
    kwargs = dict(lr=1e-2, amsgrad=True, state_dtype="int8")
    opt_h, opt_d = fo.Adam([w], **kwargs), fo.Adam([dw], **kwargs)
    for _ in range(2):
        g = (rng.standard_normal(w.size) * scale).astype(np.float32)
        opt_h.step([g])
        opt_d.step([to_device(g)])
    assert host(dw).tobytes() == w.tobytes()
    assert_same_state(opt_d, opt_h)


def test_bad_input_is_refused_before_any_write(monkeypatch):
    from fastopt.kernels import block_cuda

    w, opt = _adam_unit(monkeypatch)
    before = snapshot(w, opt)
    with pytest.raises(ValueError, match="shape"):
        opt.step([to_device(np.ones(SMALL - 1, np.float32))])
    with pytest.raises((TypeError, ValueError)):
        opt.step([np.ones(SMALL, np.float32)])  # a host gradient for device parameters
    assert snapshot(w, opt) == before
    # the kernel's own checks: slots of host arrays, of another size, too few slots
    s = opt.state[0]
    storage = Storage("float32", "float32", "int8", False, False)
    hs = tuple(np.float32(v) for v in range(7)), (np.float32(1), np.float32(0))
    g = to_device(np.ones(SMALL, np.float32))
    m, v = s["exp_avg"], s["exp_avg_sq"]
    on_host = precision.Quantized(host(m.codes), host(m.absmax), True)
    short = precision.Quantized(m.codes, _cuda().to_device(np.zeros(1, np.float32)), True)
    for states, exc, match in (
        ([on_host, v], TypeError, "slot 0 of adam must be an 8-bit slot of device arrays"),
        ([m, short], ValueError, "slot 1 of adam: absmax must be float32 of 2 elements"),
        ([m], ValueError, "adam takes 2 state slots, got 1"),
    ):
        with pytest.raises(exc, match=match):
            block_cuda.apply("adam", storage, w, g, states, None, *hs, (0, 1, 0))
    with pytest.raises(ValueError, match="threads must divide 256"):
        block_cuda.apply("adam", storage, w, g, [m, v], None, *hs, (0, 1, 0), threads=100)
    assert snapshot(w, opt) == before


def test_a_backend_without_block_kernels_is_pointed_to_those_with():
    storage = Storage("float32", "float32", "int8", False, False)

    class ReferenceLike:
        name = "numpy"

    with pytest.raises(TypeError, match="backend 'numpy' cannot keep 8-bit.*backend='cupy' or"):
        precision.check_backend_stores(ReferenceLike(), storage, "w")
    assert {"numba-cuda", "cupy"} <= set(precision.INT8_BACKENDS)


def test_state_dict_moves_between_numba_cpu_and_numba_cuda(monkeypatch):
    """The device optimizer's state_dict equals the host one's, and each loads into the other
    backend's optimizer: the next step agrees bit for bit."""
    monkeypatch.setattr(precision, "MIN_8BIT_SIZE", 256)
    rng = np.random.default_rng(4)
    w = rng.standard_normal(SMALL).astype(np.float32)
    g1, g2 = (rng.standard_normal(SMALL).astype(np.float32) for _ in range(2))
    dw = to_device(w)
    opt_h, opt_d = (
        fo.Adam([w], lr=1e-2, state_dtype="int8"),
        fo.Adam([dw], lr=1e-2, state_dtype="int8"),
    )
    opt_h.step([g1])
    opt_d.step([to_device(g1)])
    sd_h, sd_d = opt_h.state_dict(), opt_d.state_dict()
    for k, v in sd_h["state"][0].items():
        assert np.asarray(sd_d["state"][0][k]).tobytes() == np.asarray(v).tobytes(), k
    w2, dw2 = host(dw), to_device(w)
    other_h = fo.Adam([w2], lr=1e-2, state_dtype="int8")
    other_d = fo.Adam([dw2], lr=1e-2, state_dtype="int8")
    other_h.load_state_dict(sd_d)
    other_d.load_state_dict(sd_h)
    for opt, grad in ((opt_h, g2), (other_h, g2), (other_d, to_device(g2))):
        opt.step([grad])
    assert host(dw2).tobytes() == w.tobytes() == w2.tobytes()
    assert_same_state(other_d, opt_h)
    assert_same_state(other_d, other_h)
