"""CUDA kernels under the Numba CUDA simulator.

Run in its own process with the simulator switched on before numba is imported::

    NUMBA_ENABLE_CUDASIM=1 pytest tests/test_cuda_sim.py -q -p no:cacheprovider

The simulator runs every kernel as Python, one thread per CUDA thread, so the arrays are small.
Each kernel is compared with the CPU kernel on the same inputs and with the plain-Python rule
applied element by element (which is what the simulator executes: bit-identical).
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from ptx_without_gpu import PREAMBLE, run_ptx_script

pytestmark = pytest.mark.skipif(
    os.environ.get("NUMBA_ENABLE_CUDASIM") != "1",
    reason="CUDA simulator tests: run with NUMBA_ENABLE_CUDASIM=1 in their own process",
)

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    from numba import cuda

    from fastopt.kernels import cpu, rules
    from fastopt.kernels import cuda as kcuda
    from fastopt.kernels.compile_rules import ARITY
else:  # keep collection free of numba.cuda imports outside the simulator
    cuda = cpu = rules = kcuda = ARITY = None

DTYPES = (np.float32, np.float64)
N = 50
STEPS = 3


def _h(rule_name, t):
    """A plausible per-step scalar tuple (float64) of ``rule_name`` at step ``t`` (1-based).

    Hyper-parameters vary with ``t`` so both sides of every branch in the rules run (lerp weight
    below/above 0.5, first momentum step, Nesterov, RAdam rectification, maximize).
    """
    lr, wd = 0.01, 0.02
    gsign = -1.0 if t == 2 else 1.0
    beta1 = 0.9 if t % 2 else 0.3  # 1 - beta1 below / above 0.5: both lerp forms
    beta2, eps = 0.999, 1e-8
    bc1, bc2 = 1 - beta1**t, 1 - beta2**t
    decay = 1 - lr * wd if t != 1 else 1.0
    adam_head = (decay, 0.0 if t != 1 else wd, gsign, beta1, 1 - beta1, beta2, 1 - beta2)
    rms = (lr, wd, gsign, 0.99 if t % 2 else 0.4, 0.01 if t % 2 else 0.6, eps, 0.9)
    table = {
        "sgd": (0.1, wd, gsign),
        "sgd_momentum": (0.1, wd, gsign, 0.9, 0.9, float(t % 2 == 0), float(t == 1)),
        "adagrad": (0.1 / (1 + (t - 1) * 0.01), wd, gsign, 1e-10),
        "rmsprop": rms,
        "rmsprop_momentum": rms,
        "rmsprop_centered": rms,
        "rmsprop_centered_momentum": rms,
        "adadelta": (1.0, wd, gsign, 0.9, 0.1, 1e-6),
        "adam": adam_head + (lr / bc1, math.sqrt(bc2), eps),
        "adam_amsgrad": adam_head + (lr / bc1, math.sqrt(bc2), eps),
        "adamax": (wd, gsign, beta1, 1 - beta1, beta2, eps, lr / bc1),
        "nadam": adam_head + (bc2, eps, lr * 0.05 / 0.95, lr * 0.9 / 0.5),
        "radam": adam_head + (bc1, lr, float(t >= 2), 0.3 * t, math.sqrt(bc2), eps),
        "rprop": (gsign, 0.5, 1.2, 1e-6, 50.0, 0.0),
        "yogi": (lr, wd, gsign, beta1, 1 - beta1, 1 - beta2, 1.0, 1e-3),
        "lion": (decay, 1e-3, gsign, beta1, 1 - beta1, 0.99, 0.01),
        "ema": (0.001, 0.999) if t % 2 else (0.7, 0.3),
        "asgd": (1 - 1e-4 * lr, lr, wd, gsign, 1.0 / t, float(t > 1)),
        "sf_sgd": (lr, wd, 1.0 / t, 1 - 1.0 / t, lr * (0.9 * (1 - 1.0 / t) - 1)),
        "sf_adamw": (lr, wd, 1.0 / t, 1 - 1.0 / t, lr * (beta1 * (1 - 1.0 / t) - 1))
        + (beta2, 1 - beta2, bc2, eps),
    }
    return table[rule_name]


def _gs(t):
    """(gradient scale, clip value) at step ``t``: identity, scaling, scaling and clipping."""
    return [(1.0, 0.0), (0.5, 0.0), (0.8, 0.7)][(t - 1) % 3]


def _initial_state(rule_name, n, dtype, rng):
    """State arrays in the rule's domain (positive second moments, sq >= gavg^2, ...)."""
    k = ARITY[rule_name]
    states = [rng.standard_normal(n) for _ in range(k)]
    positive = {  # slots that sit under a square root or a division
        "adagrad": (0,),
        "rmsprop": (0,),
        "rmsprop_momentum": (0,),
        "adadelta": (0, 1),
        "adam": (1,),
        "adam_amsgrad": (1, 2),
        "adamax": (1,),
        "nadam": (1,),
        "radam": (1,),
        "rprop": (1,),
        "yogi": (1,),
        "sf_adamw": (1,),
    }.get(rule_name, ())
    for j in positive:
        states[j] = np.abs(states[j]) + 0.1
    if rule_name == "rmsprop_centered":
        states[0] = states[1] ** 2 + np.abs(states[0])
    if rule_name == "rmsprop_centered_momentum":
        states[0] = states[2] ** 2 + np.abs(states[0])
    if rule_name == "rprop":
        states[0][::5] = 0.0  # previous gradient exactly zero: the third branch
    return [s.astype(dtype) for s in states]


def _inputs(rule_name, dtype, n=N, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(dtype)
    grads = [rng.standard_normal(n).astype(dtype) for _ in range(STEPS)]
    for g in grads:
        g[::7] = 0.0  # exact zeros exercise the sign branches (rprop, lion)
    states = _initial_state(rule_name, n, dtype, rng)
    hs = [
        (tuple(dtype(x) for x in _h(rule_name, t)), tuple(dtype(x) for x in _gs(t)))
        for t in range(1, STEPS + 1)
    ]
    return p, grads, states, hs


def _run_gpu(rule_name, p, grads, states, hs, **launch):
    dp = cuda.to_device(p)
    dstates = [cuda.to_device(s) for s in states]
    for g, (h, gs) in zip(grads, hs, strict=True):
        kcuda.apply(rule_name, dp, cuda.to_device(g), dstates, h, gs, **launch)
    return dp.copy_to_host(), [d.copy_to_host() for d in dstates]


def _run_cpu(rule_name, p, grads, states, hs):
    p, states = p.copy(), [s.copy() for s in states]
    for g, (h, gs) in zip(grads, hs, strict=True):
        cpu.apply(rule_name, p, g, states, h, gs)
    return p, states


def _run_python(rule_name, p, grads, states, hs):
    """The uncompiled rule on NumPy scalars, element by element."""
    fn = getattr(rules, rule_name)
    p, states = p.copy(), [s.copy() for s in states]
    for g, (h, gs) in zip(grads, hs, strict=True):
        for i in range(p.size):
            out = fn(p[i], rules.transformed_grad(g[i], *gs), *(s[i] for s in states), h)
            p[i] = out[0]
            for s, v in zip(states, out[1:], strict=True):
                s[i] = v
    return p, states


def _assert_identical(got, want, what):
    gp, gs = got
    wp, ws = want
    np.testing.assert_array_equal(gp, wp, err_msg=f"{what}: parameter")
    for j, (a, b) in enumerate(zip(gs, ws, strict=True)):
        np.testing.assert_array_equal(a, b, err_msg=f"{what}: state {j}")


def _assert_close(got, want, rtol, what):
    gp, gs = got
    wp, ws = want
    np.testing.assert_allclose(gp, wp, rtol=rtol, atol=0, err_msg=f"{what}: parameter")
    for j, (a, b) in enumerate(zip(gs, ws, strict=True)):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=0, err_msg=f"{what}: state {j}")


RULE_NAMES = rules.RULES if rules is not None else ()
PYTHON_DOUBLE_IN_FLOAT32 = {"adadelta"}
"""Rules whose plain-Python evaluation on float32 scalars is not float32 arithmetic:
``math.sqrt(a) / math.sqrt(b)`` divides two Python floats (double) before rounding, where the
compiled rule divides two float32 square roots. Only the simulator runs the Python rule; on a GPU
the compiled rule is float32 throughout. Everything else matches the CPU kernel bit for bit."""


def test_simulator_active():
    assert kcuda._simulating()
    ok, why = kcuda.available()
    assert ok is True and "simulator" in why


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_rule_matches_cpu_and_python(rule_name, dtype):
    p, grads, states, hs = _inputs(rule_name, dtype)
    got = _run_gpu(rule_name, p, grads, states, hs)
    assert got[0].dtype == dtype and all(s.dtype == dtype for s in got[1])
    assert not np.array_equal(got[0], p), "the kernel did not update the parameter"
    # The simulator executes the very same Python rule: bit-identical in both dtypes.
    _assert_identical(got, _run_python(rule_name, p, grads, states, hs), "vs plain Python")
    want = _run_cpu(rule_name, p, grads, states, hs)
    if dtype is np.float32 and rule_name in PYTHON_DOUBLE_IN_FLOAT32:
        _assert_close(got, want, 1e-5, "vs CPU kernel")
    else:
        _assert_identical(got, want, "vs CPU kernel")


@pytest.mark.parametrize("rule_name", ["sgd", "adagrad", "adam", "rmsprop_centered_momentum"])
def test_grid_stride_covers_more_elements_than_threads(rule_name):
    """8 threads in total (2 blocks of 4) must still update all 50 elements."""
    p, grads, states, hs = _inputs(rule_name, np.float64, seed=1)
    got = _run_gpu(rule_name, p, grads, states, hs, threads=4, blocks=2)
    _assert_identical(got, _run_cpu(rule_name, p, grads, states, hs), "small grid")
    assert np.all(got[0] != p), "some elements were not visited"


@pytest.mark.parametrize("n", [0, 1])
@pytest.mark.parametrize("rule_name", ["sgd", "adam", "rmsprop_centered_momentum"])
def test_tiny_arrays(rule_name, n):
    p, grads, states, hs = _inputs(rule_name, np.float32, n=n, seed=2)
    got = _run_gpu(rule_name, p, grads, states, hs)
    _assert_identical(got, _run_cpu(rule_name, p, grads, states, hs), f"n={n}")
    assert got[0].shape == (n,)


def test_launch_config():
    assert kcuda.launch_config(1) == (1, kcuda.THREADS)
    assert kcuda.launch_config(0) == (1, kcuda.THREADS)
    assert kcuda.launch_config(kcuda.THREADS + 1) == (2, kcuda.THREADS)
    cap = kcuda.BLOCKS_PER_SM * kcuda.SIMULATOR_SM_COUNT
    assert kcuda.launch_config(10**12) == (cap, kcuda.THREADS)  # 64-bit sizes: the grid strides
    assert kcuda.launch_config(100, threads=32) == (4, 32)
    assert kcuda.launch_config(100, threads=32, blocks=3) == (3, 32)


def test_kernels_are_cached_per_rule():
    assert kcuda.kernel("adam") is kcuda.kernel("adam")
    assert kcuda.kernel("adam") is not kcuda.kernel("nadam")


def test_apply_rejects_host_arrays_and_wrong_state_count():
    p, grads, states, hs = _inputs("adam", np.float64, n=4)
    with pytest.raises(TypeError, match="device arrays"):
        kcuda.apply("adam", p, grads[0], states, *hs[0])
    dp, dg = cuda.to_device(p), cuda.to_device(grads[0])
    with pytest.raises(ValueError, match="2 state arrays"):
        kcuda.apply("adam", dp, dg, [cuda.to_device(states[0])], *hs[0])


def test_launches_pass_the_arrays_and_one_scalar_tuple(monkeypatch):
    """numba-cuda prepares every launch argument in Python on every launch: the kernels take the
    arrays and ONE scalar tuple ``hs = (*h, gscale, clip)`` (the storage kernels also the integer
    ``rs``), which ``apply`` builds from its ``h`` and ``gs`` (the storage kernels' results are
    compared with the CPU's in tests/test_storage_sim.py)."""
    import inspect

    from fastopt.kernels import access, cuda_launch, cuda_storage, segment_cuda

    launched = []
    configured = cuda_launch.configured

    def recording(kernel, *config):
        run = configured(kernel, *config)

        def launch(*args):
            launched.append((list(inspect.signature(kernel.py_func).parameters), args))
            run(*args)

        return launch

    monkeypatch.setattr(cuda_launch, "configured", recording)
    p, grads, states, hs = _inputs("adam", np.float32, n=8)
    got = _run_gpu("adam", p, grads[:1], states, hs[:1])
    _assert_identical(got, _run_cpu("adam", p, grads[:1], states, hs[:1]), "adam")
    ((names, args),) = launched
    assert names == ["p", "g", "s0", "s1", "hs"] and len(args) == 5
    assert args[-1] == hs[0][0] + hs[0][1] and all(type(v) is np.float32 for v in args[-1])

    import ml_dtypes

    bf16 = access.Storage("bfloat16", "bfloat16", "bfloat16", False, False)
    arrays = [a.astype(ml_dtypes.bfloat16) for a in (p, grads[0], *states)]
    dev = [cuda.to_device(a.view(np.uint16)).view(a.dtype) for a in arrays]
    cuda_storage.apply("adam", bf16, dev[0], dev[1], dev[2:], None, *hs[0], (0, 1, 0))
    assert dev[0].view(np.uint16).copy_to_host().tobytes() != arrays[0].tobytes()  # it ran
    names, args = launched[-1]
    assert names == ["p", "w", "g", "s0", "s1", "hs", "rs"] and len(args) == 7
    assert args[-2] == hs[0][0] + hs[0][1] and args[-1] == (0, 1, 0)
    for rule in rules.SEGMENT_RULES:
        for k in segment_cuda.kernels(rule)[::2]:
            if k is not None:
                names = list(inspect.signature(k.py_func).parameters)
                assert "hs" in names and "h" not in names and "gs" not in names, (rule, names)


def test_import_and_available_without_simulator():
    """Outside the simulator (this machine may have no CUDA at all): import works, available()
    returns (bool, str) and does not raise."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    code = (
        "from fastopt.kernels import cuda as k\n"
        "ok, why = k.available()\n"
        "assert isinstance(ok, bool) and isinstance(why, str) and why, (ok, why)\n"
        "print(ok, why)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr


_PTX_CHECK = (
    PREAMBLE
    + """from fastopt.kernels import cuda as kcuda
from fastopt.kernels.compile_rules import ARITY

for name, nh in json.loads(sys.argv[1]).items():
    for dt in (types.float32, types.float64):
        arr = types.Array(dt, 1, "C")
        sig = (arr,) * (2 + ARITY[name]) + (types.UniTuple(dt, nh + 2),)
        ptx, _ = cuda.compile_ptx(kcuda.kernel(name).py_func, sig, cc=(9, 0))
        assert "call." not in ptx, f"{name} {dt}: device functions not inlined"
        print(name, dt, "ok")
"""
)


def test_every_kernel_compiles_to_ptx_for_a_real_gpu():
    """The simulator runs Python, so compile every kernel with the real CUDA target too (PTX for
    sm_90 through NVVM, no GPU needed); skipped where libNVVM/libdevice are missing."""
    import json

    lengths = json.dumps({name: len(_h(name, 1)) for name in RULE_NAMES})
    out = run_ptx_script(_PTX_CHECK, lengths)
    assert out.count(" ok") == 2 * len(RULE_NAMES)


# ---------------------------------------------------------------------------------------------
# The simulator itself (tests/cudasim.py, applied by conftest.py).


def test_threads_of_a_block_get_one_shared_array_even_when_creating_it_is_slow(monkeypatch):
    """Eight threads of one block ask for the block's shared array at once while creating it
    releases the GIL (a slow ``empty``): all get the same array. The simulator's own allocation
    gave each thread an array of its own (this test failed with it), which
    made the block reductions add values never written (cudasim.py)."""
    import threading
    import time

    from numba.cuda.simulator import kernelapi

    class SlowNumpy:
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def empty(*args, **kwargs):
            time.sleep(0.02)
            return np.empty(*args, **kwargs)

    assert getattr(kernelapi.FakeCUDAShared.array, "fastopt_atomic", False)
    monkeypatch.setattr(kernelapi, "np", SlowNumpy())
    shared = kernelapi.FakeCUDAShared(0)
    got = [None] * 8
    start = threading.Barrier(len(got))

    def ask(t):
        start.wait()
        got[t] = shared.array(4, np.float64)  # one source line: one array per block

    threads = [threading.Thread(target=ask, args=(t,)) for t in range(len(got))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(a is got[0] for a in got)
    other = shared.array(3, np.float32)  # another line: another array
    assert other is not got[0] and other.shape == (3,) and other.dtype == np.float32


# ---------------------------------------------------------------------------------------------
# L-BFGS on numba-cuda device arrays: the vector passes of kernels/vector_cuda.py.


def _rosenbrock_closure(x_of, grad_out, to_array):
    def closure():
        x = x_of()
        a, b = x[:-1], x[1:]
        loss = float(np.sum(100.0 * (b - a * a) ** 2 + (1 - a) ** 2))
        g = np.zeros_like(x)
        g[:-1] = -400.0 * a * (b - a * a) - 2 * (1 - a)
        g[1:] += 200.0 * (b - a * a)
        return loss, grad_out(to_array(g))

    return closure


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_lbfgs_on_numba_cuda_follows_the_host_iterates(line_search_fn, monkeypatch):
    """The same problem on the host and on the (simulated) GPU: the same closure calls and
    iterates to rounding (the reductions sum in another order), float64 Rosenbrock."""
    import fastopt as fo
    from fastopt.kernels import vector_cuda

    monkeypatch.setattr(vector_cuda, "THREADS", 2)
    x0 = np.linspace(-1.2, 1.0, 6)
    kw = {"lr": 0.5 if line_search_fn is None else 1.0, "max_iter": 4, "history_size": 3}
    kw["line_search_fn"] = line_search_fn

    host = x0.copy()
    calls = {"host": 0, "gpu": 0}

    def host_closure():
        calls["host"] += 1
        return _rosenbrock_closure(lambda: host, lambda g: [g], lambda g: g)()

    dev = cuda.to_device(x0)

    def gpu_closure():
        calls["gpu"] += 1
        return _rosenbrock_closure(dev.copy_to_host, lambda g: [g], cuda.to_device)()

    opt_h = fo.LBFGS([host], **kw)
    opt_d = fo.LBFGS([dev], backend="numba-cuda", **kw)
    for _ in range(2):
        lh = opt_h.step(host_closure)
        ld = opt_d.step(gpu_closure)
        assert ld == pytest.approx(lh, rel=1e-10)
        np.testing.assert_allclose(dev.copy_to_host(), host, rtol=1e-9, atol=1e-12)
    assert calls["gpu"] == calls["host"]
    sd = opt_d.state_dict()
    assert isinstance(sd["state"][0]["d"], np.ndarray)
    again = fo.LBFGS([cuda.to_device(dev.copy_to_host())], backend="numba-cuda", **kw)
    again.load_state_dict(sd)
    assert again.units()[0].state["d"].copy_to_host().tolist() == sd["state"][0]["d"].tolist()


def test_lbfgs_vector_passes_match_the_cpu_kernels(monkeypatch):
    from fastopt.kernels import vector, vector_cuda

    monkeypatch.setattr(vector_cuda, "THREADS", 8)
    rng = np.random.default_rng(5)
    x, y, z = (rng.standard_normal(300) for _ in range(3))
    dx, dy, dz = (cuda.to_device(a) for a in (x, y, z))
    assert vector_cuda.dot(dx, dy) == pytest.approx(vector.dot(x, y), rel=1e-13)
    assert vector_cuda.abs_sum_max(dx) == pytest.approx(vector.abs_sum_max(x), rel=1e-13)
    ys, ss = np.empty(300), np.empty(300)
    dys, dss = cuda.device_array(300), cuda.device_array(300)
    got = vector_cuda.curvature_pair(dx, dy, dz, 0.7, dys, dss)
    assert got == pytest.approx(vector.curvature_pair(x, y, z, 0.7, ys, ss), rel=1e-13)
    np.testing.assert_array_equal(dys.copy_to_host(), ys)
    np.testing.assert_array_equal(dss.copy_to_host(), ss)
    p, dp = x.copy(), cuda.to_device(x)
    assert vector_cuda.axpy_absmax(dp, 0.5, dy) == vector.axpy_absmax(p, 0.5, y)
    o, do = np.empty(300), cuda.device_array(300)
    assert vector_cuda.scale_dot(do, -1.0, dx, dz) == pytest.approx(
        vector.scale_dot(o, -1.0, x, z), rel=1e-13
    )
    np.testing.assert_array_equal(do.copy_to_host(), o)
    vector_cuda.fill(do, 0.0)
    assert not do.copy_to_host().any()
    # An empty vector after a full one: nothing launches, and the sums are 0, not the last call's.
    empty = cuda.device_array(0)
    for op in (
        lambda: vector_cuda.dot(empty, empty),
        lambda: vector_cuda.abs_sum_max(empty)[0],
        lambda: vector_cuda.abs_sum_max(empty)[1],
        lambda: vector_cuda.axpy_absmax(empty, 0.5, empty),
    ):
        assert vector_cuda.abs_sum_max(dx)[0] > 0  # fills the shared partials buffer
        assert op() == 0.0


_VECTOR_PTX_CHECK = (
    PREAMBLE
    + """import re
from fastopt.kernels import vector_cuda

cases = [(op, types.float64) for op in vector_cuda._ELEMENTS] + [("pair", types.float32)]
for op, dt in cases:
    arr = types.Array(dt, 1, "C")
    sig = (types.int64, types.Array(types.float64, 2, "C")) + (arr,) * 5
    sig += (types.float64, types.float64)
    ptx, _ = cuda.compile_ptx(vector_cuda._kernel(op, 256).py_func, sig, cc=(9, 0))
    assert "fma.rn.f64" in ptx or op not in ("update_dot", "axpy_absmax"), op
    # NVVM fuses each product added to a sum (acc += x*y) into an fma; vector_kernels.cu copies it
    products = set(re.findall(r"mul(?:\\.rn)?\\.f64\\s+(%fd\\d+),", ptx))
    summed = re.findall(r"add(?:\\.rn)?\\.f64\\s+%fd\\d+,\\s*(%fd\\d+),\\s*(%fd\\d+);", ptx)
    assert not products & {r for pair in summed for r in pair}, op
    assert "fma.rn.f64" in ptx or op not in ("dot", "scale_dot", "pair"), op
    print(op, dt, "ok")
"""
)


def test_lbfgs_vector_kernels_compile_to_ptx_for_a_real_gpu():
    """Every vector pass through NVVM for sm_90 (float64, and the float32 curvature pair): the
    simulator runs Python and its ``cuda.fma`` rounds twice; the real target must emit an fma."""
    out = run_ptx_script(_VECTOR_PTX_CHECK)
    from fastopt.kernels import vector_cuda

    assert out.count(" ok") == len(vector_cuda._ELEMENTS) + 1
