"""fastopt.Adafactor on numba-cuda device arrays (kernels/factored_cuda.py) under the CUDA simulator,
which runs the kernels as Python: every value equals the numba-cpu kernels' bit for bit.

Run in its own process with the simulator switched on before numba is imported::

    NUMBA_ENABLE_CUDASIM=1 pytest tests/test_adafactor_cuda_sim.py -q -p no:cacheprovider

The simulator runs every CUDA thread as a Python thread: a few tiny tensors, a few steps. The plan's
tile height and vector piece length (read by ``factored.plan`` alone, never by a kernel) are made
small, so that tiny tensors still have several tiles and pieces per segment.

Outside the simulator (the default run) the kernels are compiled to PTX for a GPU, without one,
and, on a machine with a CUDA GPU (skipped elsewhere), run there: within the tolerance of NVVM's
fused multiply-adds of numba-cpu's values.
"""

import os

import numpy as np
import pytest
from ptx_without_gpu import PREAMBLE, run_ptx_script

import fastopt as fo
from fastopt.kernels import factored

SIMULATING = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
sim_only = pytest.mark.skipif(
    not SIMULATING,
    reason="CUDA simulator tests: run with NUMBA_ENABLE_CUDASIM=1 in their own process",
)

SHAPES = {"w": (3, 7), "t": (2, 3, 2), "e": (2, 257), "b": (5,), "s": ()}
KW = {"lr": 0.05, "weight_decay": 0.1, "maximize": True, "max_grad_value": 0.8}


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 2 rows and vector pieces of 3 elements: 'w' has 2 tiles (the second of 1 row),
    't' 2 per matrix, 'e' 2 column tiles (256 and 1 columns), 'b' 2 pieces."""
    monkeypatch.setattr(factored, "TILE_ROWS", 2)
    monkeypatch.setattr(factored, "VECTOR_CHUNK", 3)
    items = factored.plan(list(SHAPES.values()))["items"]
    assert np.bincount(items[:, factored.SEG]).tolist() == [2, 4, 2, 2, 1]


def _grads(t, dtype):
    rng = np.random.default_rng(10 + t)
    return {k: np.array(rng.standard_normal(s) * (1 + t), dtype) for k, s in SHAPES.items()}


def _device_paramset(ps):
    """A ParamSet adopting device copies of ``ps``'s buffers (numba device arrays)."""
    from numba import cuda

    flat, grad = cuda.to_device(np.array(ps.flat)), cuda.to_device(np.array(ps.grad_flat))
    return fo.ParamSet.from_buffers(flat, grad, [(k, ps.shapes[k]) for k in ps.names])


def _step(ps, opt, t, dtype):
    grads = _grads(t, dtype)
    for k in SHAPES:
        lo, hi = ps.offsets[k]
        ps.grad_flat[lo:hi] = grads[k].reshape(-1)
    opt.step()


def _assert_same_bits(dev, host):
    """Parameters and state of two (device, host) (ParamSet, optimizer) pairs, bit for bit."""
    (ps_d, opt_d), (ps_h, opt_h) = dev, host
    assert ps_d.flat.copy_to_host().tobytes() == np.asarray(ps_h.flat).tobytes()
    sd, sh = opt_d.state_dict()["state"][0], opt_h.state_dict()["state"][0]
    assert sd.keys() == sh.keys()
    for k in ("row_var", "col_var", "variance"):
        assert sd[k].tobytes() == sh[k].tobytes(), k
    assert sd["step"] == sh["step"]


@sim_only
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_paramset_on_device_equals_numba_cpu_bit_for_bit(dtype, small_tiles):
    rng = np.random.default_rng(0)
    host = fo.ParamSet({k: np.array(rng.standard_normal(s), dtype) for k, s in SHAPES.items()})
    dev = _device_paramset(host)
    opt_h, opt_d = fo.Adafactor(host, **KW), fo.Adafactor(dev, **KW)
    assert opt_d._groups[0]["units"][0].backend.name == "numba-cuda"
    for t in range(2):
        _step(host, opt_h, t, dtype)
        _step(dev, opt_d, t, dtype)
    _assert_same_bits((dev, opt_d), (host, opt_h))
    assert type(opt_d.state[0]["row_var"]).__name__ == "FakeCUDAArray"  # state on the device
    # state_dict: host arrays; loaded into a new device optimizer, the next step is the same
    sd = opt_d.state_dict()
    assert isinstance(sd["state"][0]["col_var"], np.ndarray)
    again = _device_paramset(dev)
    opt_again = fo.Adafactor(again, **KW)
    opt_again.load_state_dict(sd)
    for ps, opt in ((host, opt_h), (dev, opt_d), (again, opt_again)):
        _step(ps, opt, 2, dtype)
    _assert_same_bits((dev, opt_d), (host, opt_h))
    _assert_same_bits((again, opt_again), (host, opt_h))


@sim_only
def test_plain_device_arrays_share_one_update_buffer():
    """A list of device arrays: one unit each, torch's factor shapes in state_dict, one shared
    scratch ``update`` on the device (grown for the larger array), the numba-cpu bits."""
    from numba import cuda

    rng = np.random.default_rng(1)
    host = [rng.standard_normal(s) for s in ((2,), (2, 3, 2))]
    dev = [cuda.to_device(a) for a in host]
    opt_h, opt_d = fo.Adafactor(host, lr=0.1), fo.Adafactor(dev, lr=0.1)
    for _ in range(2):
        grads = [rng.standard_normal(a.shape) for a in host]
        opt_h.step(grads)
        opt_d.step([cuda.to_device(g) for g in grads])
    for d, h in zip(dev, host):
        assert d.copy_to_host().tobytes() == h.tobytes()
    sd, sh = opt_d.state_dict()["state"], opt_h.state_dict()["state"]
    assert sd[1]["row_var"].shape == (2, 3, 1) and sd[1]["col_var"].shape == (2, 1, 2)
    for i in sh:
        for k in ("row_var", "col_var", "variance"):
            assert sd[i][k].tobytes() == sh[i][k].tobytes(), (i, k)
    cache = opt_d._layouts
    shared = cache["update", "numba-cuda", 0, np.dtype(np.float64)]
    updates = [hit[3]["update"] for hit in cache.values() if isinstance(hit, list)]
    assert [u.size for u in updates] == [2, 12] and shared.size == 12
    shared.copy_to_device(np.arange(12.0))
    assert [u.copy_to_host().tolist() for u in updates] == [[0, 1], list(range(12))]


@sim_only
def test_launch_threads_change_no_bit():
    """The kernels over one layout with 1, 3 and 8 threads per block: numba-cpu's bits (a
    vector piece of two runs of lanes: 256 elements and 4)."""
    from numba import cuda

    from fastopt.kernels import factored_cuda

    shapes = [(3, 5), (260,)]
    layout = factored.plan(shapes)
    rng = np.random.default_rng(2)
    p0, g = rng.standard_normal(275), rng.standard_normal(275)
    h = (1.0, 0.7, 0.3, 1e-30, 1e-60, 0.99, 1.0)
    args = (h, (1e-3, 0.01, 1.0), (1.0, 0.0))
    want = [p0.copy(), *(np.zeros(n) for n in (3, 5, 260))]
    factored.step(want[0], g, *want[1:], *args, layout, factored.scratch(layout, np.float64))
    dlayout = factored_cuda.device_layout(layout, cuda.to_device(p0))
    for threads in (1, 3, 8):
        got = [cuda.to_device(a) for a in (p0, np.zeros(3), np.zeros(5), np.zeros(260))]
        work = factored_cuda.scratch(layout, np.float64, got[0])
        factored_cuda.step(
            got[0], cuda.to_device(g), *got[1:], *args, dlayout, work, threads=threads
        )
        for a, b in zip(got, want):
            assert a.copy_to_host().tobytes() == b.tobytes(), threads


_PTX = (
    PREAMBLE
    + """from fastopt.kernels import factored_cuda as fc

i64, i64_2 = types.Array(types.int64, 1, "C"), types.Array(types.int64, 2, "C")
f64, f64_2 = types.Array(types.float64, 1, "C"), types.Array(types.float64, 2, "C")
h64 = types.UniTuple(types.float64, 3)
for dt in (types.float32,):  # float64 takes the same paths (its compile costs seconds)
    a, hs = types.Array(dt, 1, "C"), types.UniTuple(dt, 9)
    signatures = [
        (a, hs, i64_2, f64, f64),
        (i64_2, f64, f64, a, a, a, hs),
        (a, a, hs, i64_2, a, a, a, a, a, f64_2),
        (i64, i64, f64_2, h64, a),
        (a, hs, i64_2, a, a),
    ]
    for phase, (k, sig) in enumerate(zip(fc.kernels(), signatures)):
        ptx, _ = cuda.compile_ptx(k.py_func, sig, cc=(9, 0))
        # float64 is the sums' alone: explicitly rounded adds, never contracted into an FMA
        assert "fma.rn.f64" not in ptx and ("add.rn.f64" in ptx) == (phase < 3), phase
        print("ok", phase, dt)
"""
)


@pytest.mark.skipif(SIMULATING, reason="compiled outside the simulator, in the default run")
def test_kernels_compile_to_ptx_without_contracted_sums():
    assert run_ptx_script(_PTX).count("ok") == 5


GPU_SHAPES = {"w": (300, 70), "t": (3, 40, 300), "v": (5000,), "b": (7,), "s": ()}
"""Tensors of several default-size tiles and vector pieces; the host runs the parallel kernel."""
GPU_TOLERANCE = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-14)}


@pytest.mark.skipif(SIMULATING, reason="runs on a GPU, outside the simulator")
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_numba_cuda_on_a_gpu_follows_numba_cpu(dtype):
    """Three steps over device arrays on a real GPU against numba-cpu on the same values: the
    sums are explicitly rounded (the same bits); the element arithmetic may be contracted into
    fused multiply-adds by NVVM, hence the tolerance."""
    from numba import cuda

    if not cuda.is_available():
        pytest.skip("no CUDA GPU (numba.cuda.is_available() is False)")
    rng = np.random.default_rng(3)
    shapes = GPU_SHAPES
    host = fo.ParamSet({k: np.array(rng.standard_normal(s), dtype) for k, s in shapes.items()})
    assert host.size >= factored.PARALLEL_THRESHOLD
    flat, grad = cuda.to_device(np.array(host.flat)), cuda.to_device(np.array(host.grad_flat))
    dev = fo.ParamSet.from_buffers(flat, grad, [(k, host.shapes[k]) for k in host.names])
    opt_h, opt_d = fo.Adafactor(host, **KW), fo.Adafactor(dev, **KW)
    assert opt_d._groups[0]["units"][0].backend.name == "numba-cuda"
    for t in range(3):
        g = np.array(rng.standard_normal(host.size) * 10.0 ** (t - 1), dtype)
        host.grad_flat[...] = g
        dev.grad_flat.copy_to_device(g)
        opt_h.step()
        opt_d.step()
    tol = GPU_TOLERANCE[dtype]
    np.testing.assert_allclose(dev.flat.copy_to_host(), np.asarray(host.flat), **tol)
    sd, sh = opt_d.state_dict()["state"][0], opt_h.state_dict()["state"][0]
    for k in ("row_var", "col_var", "variance"):
        np.testing.assert_allclose(sd[k], sh[k], err_msg=k, **tol)
    assert sd["step"] == sh["step"] == 3
