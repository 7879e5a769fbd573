"""GPU audit fixes, numba-cuda under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, in its own
process, as tests/test_streams_sim.py):

1. EMA over numba device arrays copies through the backend on the EMA's stream: numba's
   ``DeviceNDArray`` has no ``copy()`` and its ``a[...] = b`` compiles a kernel that cannot type
   bfloat16 (the simulator's array forwards both to NumPy, so here they are made to raise
   outside kernels, as on a GPU); ``load_state_dict`` needs no CuPy; bfloat16 EMA matches the
   CPU EMA bit for bit.
2. ``kernels/vector_cuda.py``: the partials buffer is per thread (another thread's reduction
   between a launch and its read-back leaves it alone), and every launch, copy and
   synchronisation of the vector passes (and of an L-BFGS step) goes to the given stream.

Run::

    NUMBA_ENABLE_CUDASIM=1 pytest tests/test_gpu_audit_fixes_sim.py -q -p no:cacheprovider
"""

import os
import threading

import ml_dtypes
import numpy as np
import pytest
from test_streams_sim import GIVEN, sim  # noqa: F401  (the recording fixture)

import fastopt as fo

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
pytestmark = pytest.mark.skipif(
    not SIM, reason="CUDA simulator tests: run with NUMBA_ENABLE_CUDASIM=1 in their own process"
)

BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture
def strict_arrays(monkeypatch):
    """The simulator's device arrays refuse ``copy()`` and item assignment outside kernels, as
    numba's DeviceNDArray does for bfloat16 (no ``copy()`` at all; ``a[...] = b`` compiles an
    assignment kernel that cannot type bfloat16)."""
    from numba.cuda.simulator import kernel as sim_kernel
    from numba.cuda.simulator.cudadrv import devicearray as sim_da

    cls = sim_da.FakeCUDAArray
    setitem = cls.__setitem__

    def no_copy(self, *a, **k):
        raise AssertionError("DeviceNDArray has no copy()")

    def guarded_setitem(self, idx, val):
        if not sim_kernel._kernel_context:
            raise AssertionError("a[...] = b on a device array (numba's assignment kernel)")
        return setitem(self, idx, val)

    monkeypatch.setattr(cls, "copy", no_copy, raising=False)
    monkeypatch.setattr(cls, "__setitem__", guarded_setitem)


def _bits(a):
    return np.asarray(a).view(np.uint8).tobytes()


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16), np.dtype(np.float32)])
def test_ema_numba_cuda_matches_cpu_bit_for_bit(strict_arrays, dtype):
    from numba import cuda

    rng = np.random.default_rng(3)
    shapes = [(7, 5), (33,)]
    host = [rng.standard_normal(s).astype(np.float32).astype(dtype) for s in shapes]
    dev = [cuda.to_device(h.copy()) for h in host]
    ema_h, ema_d = fo.EMA(host, 0.9), fo.EMA(dev, 0.9)
    for _ in range(3):
        ema_h.update()
        ema_d.update()
        for h, d in zip(host, dev):  # the "training": the same new values on both
            new = (rng.standard_normal(h.shape) * 0.1).astype(np.float32).astype(dtype)
            h[...] = new
            d.copy_to_device(new)
    for a, b in zip(ema_h.averages, ema_d.averages):
        assert _bits(a) == _bits(b.copy_to_host())
    with ema_h.swapped(), ema_d.swapped():
        for h, d in zip(host, dev):
            assert _bits(h) == _bits(d.copy_to_host())
    for h, d in zip(host, dev):  # restored exactly
        assert _bits(h) == _bits(d.copy_to_host())
    sd = ema_d.state_dict()
    for a, b in zip(ema_h.state_dict()["averages"], sd["averages"]):
        assert _bits(a) == _bits(b)
    again = fo.EMA([cuda.to_device(h.copy()) for h in host], 0.9)
    again.load_state_dict(sd)  # no CuPy needed (it is not installed here)
    for a, b in zip(ema_h.averages, again.averages):
        assert _bits(a) == _bits(b.copy_to_host())
    ema_h.copy_to_params()
    ema_d.copy_to_params()
    for h, d in zip(host, dev):
        assert _bits(h) == _bits(d.copy_to_host())


def test_ema_load_state_dict_without_cupy(monkeypatch):
    import sys

    from numba import cuda

    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    p = cuda.to_device(np.linspace(-1, 1, 8).astype(np.float32))
    ema = fo.EMA([p], 0.9)
    ema.update()
    ema.update()
    sd = ema.state_dict()
    other = fo.EMA([cuda.to_device(np.zeros(8, np.float32))], 0.9)
    other.load_state_dict(sd)
    assert _bits(other.averages[0].copy_to_host()) == _bits(sd["averages"][0])


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float32)])
def test_ema_everything_on_the_ema_stream(sim, dtype):  # noqa: F811
    from numba import cuda

    p = cuda.to_device(np.linspace(-1, 1, 40).astype(np.float32).astype(dtype))
    ema = fo.EMA([p], 0.9, stream=GIVEN)
    with sim:
        ema.update()
        ema.update()
        with ema.swapped():
            pass
        ema.copy_to_params()
        sd = ema.state_dict()
        ema.load_state_dict(sd)
    assert sim.ops, "nothing recorded"
    assert sim.off_stream(GIVEN) == []
    assert sim.streams[GIVEN].syncs >= 1  # state_dict read its averages after the stream


def test_vector_cuda_partials_are_per_thread(monkeypatch):
    """Thread B's whole reduction runs between thread A's launch and A's read-back (as the
    launches of two threads can interleave on a GPU): A still reads its own sums."""
    from numba import cuda
    from numba.cuda.simulator.cudadrv import devicearray as sim_da

    from fastopt.kernels import vector_cuda as vc

    n = 3000
    xa = cuda.to_device(np.full(n, 1.0, np.float32))
    xb = cuda.to_device(np.full(n, 2.0, np.float32))
    assert vc.dot(xb, xb) == 4.0 * n  # thread B's buffer of this size exists (old: the one)
    to_host = sim_da.FakeCUDAArray.copy_to_host
    main = threading.get_ident()
    other = {}

    def interleaved(self, ary=None, stream=0):
        if threading.get_ident() == main and not other:
            t = threading.Thread(target=lambda: other.setdefault("b", vc.dot(xb, xb)))
            t.start()
            t.join()
        return to_host(self, ary, stream)

    monkeypatch.setattr(sim_da.FakeCUDAArray, "copy_to_host", interleaved)
    assert vc.dot(xa, xa) == 1.0 * n
    assert other["b"] == 4.0 * n


def test_vector_cuda_on_the_given_stream(sim):  # noqa: F811
    from numba import cuda

    from fastopt.kernels import vector_cuda as vc

    x = cuda.to_device(np.arange(100, dtype=np.float64))
    y = cuda.to_device(np.ones(100))
    with sim:
        assert vc.dot(x, y, GIVEN) == float(np.arange(100).sum())
        vc.scale(y, 2.0, x, GIVEN)
        vc.copy(x, y, GIVEN)
        vc.fill(y, 3.0, GIVEN)
        assert vc.abs_sum_max(y, GIVEN) == (300.0, 3.0)
        vc.to_device(np.ones(4), None, GIVEN)
    assert sim.ops and sim.off_stream(GIVEN) == []
    assert sim.streams[GIVEN].syncs == 2  # one per reduction, nothing else waits


def test_lbfgs_numba_cuda_step_on_the_given_stream(sim):  # noqa: F811
    from numba import cuda

    x = cuda.to_device(np.linspace(-1.2, 1.0, 6))

    def closure():
        sim.active = False  # the closure's own copies are not the optimizer's
        try:
            h = x.copy_to_host()
            a, b = h[:-1], h[1:]
            loss = float(np.sum(100.0 * (b - a * a) ** 2 + (1 - a) ** 2))
            g = np.zeros_like(h)
            g[:-1] = -400.0 * a * (b - a * a) - 2 * (1 - a)
            g[1:] += 200.0 * (b - a * a)
            return loss, [cuda.to_device(g)]
        finally:
            sim.active = True

    for ls in (None, "strong_wolfe"):
        sim.ops.clear()
        opt = fo.LBFGS([x], lr=0.5, max_iter=3, history_size=2, line_search_fn=ls, stream=GIVEN)
        with sim:
            opt.step(closure)
            opt.step(closure)
        assert sim.ops and sim.off_stream(GIVEN) == []
        syncs = sim.streams[GIVEN].syncs
        opt.state_dict()  # host copies after the step's stream is synchronised
        assert sim.streams[GIVEN].syncs == syncs + 1
