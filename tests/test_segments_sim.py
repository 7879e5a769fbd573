"""The numba-cuda segment templates (kernels/segment_loops.py) under the Numba CUDA simulator: every
per-segment rule's three launches equal the numba-cpu kernels bit for bit (sums, segment
scalars, parameters, state), over empty, one-piece and two-piece segments, masked and unmasked.

Run in its own process with the simulator switched on before numba is imported::

    NUMBA_ENABLE_CUDASIM=1 pytest tests/test_segments_sim.py -q -p no:cacheprovider
"""

import os

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("NUMBA_ENABLE_CUDASIM") != "1",
    reason="CUDA simulator tests: run with NUMBA_ENABLE_CUDASIM=1 in their own process",
)

SIZES = [3, 0, 700, 300, 5]
FLAGS = [3, 1, 2, 0, 3]
H64 = {
    "segment_norms": (1.0,),
    "lamb": (1, 0.9, 0.1, 0.999, 0.001, 0.1, 0.001, 1e-6, 0, 0.01, 0.1),
    "lars": (1, 0.01, 0.001, 0.0, 0.1, 0.9, 1.0),
    "novograd": (1, 0.9, 0.25, 0.75, 1e-6, 0, 0.01, 0.1, 0.0),
}
# float32 for LAMB only: the templates do not depend on the dtype, and each simulated launch
# costs seconds (a Python thread per CUDA thread)
CASES = [(rule, np.float64) for rule in H64] + [("lamb", np.float32)]


def _launches(target, rule, dtype):
    """The bytes of every array after the reduce, segment and apply launches of ``target``
    ("cpu" or "cuda"; imported here: collection outside the simulator imports no numba.cuda)."""
    from numba import cuda

    from fastopt.kernels import segment_cpu, segment_cuda, segment_loops

    mod = segment_cuda if target == "cuda" else segment_cpu
    b = np.concatenate([[0], np.cumsum(SIZES)])
    layout = segment_loops.pieces(b, chunk=512)
    ns = len(SIZES)
    rng = np.random.default_rng(0)
    arrs = [rng.standard_normal(b[-1]).astype(dtype) for _ in range(4)]
    arrs[3] = np.abs(arrs[3])
    extra = [
        np.zeros((layout[0].size, 2)),
        np.array(FLAGS, np.int32),
        np.full(ns, 0.5, dtype),
        np.zeros((ns, 2), dtype),
        np.zeros((ns, 2)),
    ]
    if mod is segment_cuda:
        arrs = [cuda.to_device(a) for a in arrs]
        extra = [cuda.to_device(a) for a in extra]
        layout = tuple(cuda.to_device(a) for a in layout)
    out, flags, st, r, sums = extra
    h64 = H64[rule]
    h = tuple(dtype(x) for x in h64)
    gs = (dtype(1.0), dtype(0.0))
    states = arrs[2 : 2 + segment_cpu.rules.SEGMENT_RULES[rule]]
    mod.reduce(rule, arrs[0], arrs[1], arrs[2:], h, gs, flags, layout, out)
    mod.segment(rule, arrs[0], flags, layout, out, st, r, sums, h64)
    if rule != "segment_norms":
        mod.apply(rule, arrs[0], arrs[1], states, h, gs, flags, layout, r)
    host = [a if isinstance(a, np.ndarray) else a.copy_to_host() for a in arrs + extra]
    return [np.ascontiguousarray(a).tobytes() for a in host]


@pytest.mark.parametrize("rule,dtype", CASES, ids=[f"{r}-{np.dtype(d).name}" for r, d in CASES])
def test_numba_cuda_launches_equal_numba_cpu_bit_for_bit(rule, dtype):
    cpu = _launches("cpu", rule, dtype)
    sim = _launches("cuda", rule, dtype)
    assert sim == cpu
    sums = np.frombuffer(cpu[-1]).reshape(len(SIZES), 2)  # per segment: sum x^2, sum y^2
    assert np.all(sums[np.array(SIZES) > 0] > 0)
    if rule != "segment_norms":  # the step moved the parameters
        before = np.random.default_rng(0).standard_normal(sum(SIZES)).astype(dtype)
        assert not np.array_equal(np.frombuffer(cpu[0], dtype), before)
