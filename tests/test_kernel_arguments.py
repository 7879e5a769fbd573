"""The Numba kernels take their per-step scalars as ONE tuple ``hs = (*h, gradient scale, clip)``
(issue 13, item 6): numba-cuda prepares every launch argument in Python on every launch, so the
rule's tuple ``h`` and ``gs`` = (scale, clip) travel together. The public ``apply`` functions keep
taking ``h`` and ``gs`` and build the tuple. The simulator half is in tests/test_cuda_sim.py.

Nothing here compiles a new kernel: the signatures are read from the dispatchers' Python
functions, and the one call runs the serial ``sgd`` loop the other tests compile too.
"""

import inspect

import numpy as np
import pytest

from fastopt.kernels import access, block_loops, cpu, cpu_storage, factored, rules, segment_cpu
from fastopt.kernels.compile_rules import ARITY

pytestmark = pytest.mark.usefixtures("serial_kernels")


def _params(kernel):
    return list(inspect.signature(kernel.py_func).parameters)


def _slots(rule):
    return [f"s{i}" for i in range(ARITY[rule])]


def test_elementwise_kernels_take_the_arrays_and_one_scalar_tuple():
    for rule in rules.RULES:
        for parallel in (True, False):
            assert _params(cpu.kernel(rule, parallel)) == ["p", "g", *_slots(rule), "hs"], rule


def test_storage_and_block_kernels_take_one_scalar_tuple_and_the_random_stream():
    bf16 = access.Storage("bfloat16", "bfloat16", "bfloat16", False, True)
    assert _params(cpu_storage.kernel("adam", bf16)) == ["p", "w", "g", "s0", "s1", "hs", "rs"]
    int8 = access.Storage("float32", "float32", "int8", False, False)
    slots = [f"{x}{k}" for k in range(2) for x in "caql"]
    assert _params(block_loops.kernel("adam", int8)) == ["p", "w", "g", *slots, "hs", "rs"]


def test_segment_and_adafactor_kernels_take_one_scalar_tuple():
    for rule in rules.SEGMENT_RULES:
        reduce_k, _, apply_k = segment_cpu.kernels(rule, parallel=False)
        for k in (reduce_k, apply_k):
            if k is not None:
                names = _params(k)
                assert "hs" in names and "h" not in names and "gs" not in names, (rule, names)
    assert _params(factored.kernel(False))[:4] == ["p", "g", "hs", "h64"]


def test_apply_passes_h_and_gs_as_one_tuple(monkeypatch):
    """``cpu.apply(rule, p, g, states, h, gs)`` calls the kernel with ``(p, g, *states, hs)``,
    ``hs`` the scalars of ``h`` then ``gs``, and the update is the one the kernel computes."""
    f32 = np.float32
    p = np.linspace(-1, 1, 16, dtype=f32)
    g = np.linspace(2, -2, 16, dtype=f32)
    h, gs = (f32(0.1), f32(0.01), f32(1.0)), (f32(0.5), f32(0.75))
    kernel = cpu.kernel("sgd", parallel=False)
    calls = []

    def recording(*args):
        calls.append(args)
        kernel(*args)

    monkeypatch.setitem(cpu._SERIAL_KERNELS, "sgd", recording)
    got = p.copy()
    cpu.apply("sgd", got, g, [], h, gs)
    (args,) = calls
    assert len(args) == 3 and args[1] is g
    assert type(args[2]) is tuple and args[2] == h + gs
    assert all(type(v) is f32 for v in args[2])
    gg = np.clip(g * gs[0], -gs[1], gs[1])
    assert np.array_equal(got, p - h[0] * (gg + h[1] * p))
