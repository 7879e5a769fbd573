"""The standalone 8-bit passes on numba-cuda (``block_cuda.dequantize_into`` / ``quantize_from``,
``Backend.dequantize`` / ``Backend.quantize`` of numba-cuda) under the Numba CUDA simulator,
against the numba-cpu passes (``block_loops``) bit for bit.

Run in its own process with the simulator switched on before numba is imported::

    NUMBA_ENABLE_CUDASIM=1 pytest tests/test_int8_convert_sim.py -q -p no:cacheprovider

The inputs are tests/test_int8_convert.py's: blocks of very different scales, every midpoint of
the map (exact ties) and its neighbours, an all-zero block with -0.0, subnormals, a NaN block and
an infinity block, and a partial last block. The simulator runs each CUDA thread as a Python
thread, so the launches use its few threads per block (``block_cuda.SIMULATOR_LAUNCH``) unless a
test names others.
"""

import numpy as np
import pytest
from test_int8_convert import empty_slot, values_of

from fastopt import dispatch
from fastopt.kernels import block_cuda, block_loops, cuda_launch
from fastopt.kernels.storage import QUANT_BLOCK
from fastopt.optim import precision

pytestmark = [
    pytest.mark.skipif(
        not cuda_launch._simulating(),
        reason="CUDA simulator tests: run with NUMBA_ENABLE_CUDASIM=1 in their own process",
    ),
    pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning"),  # NaN and Inf blocks
]

N = 9 * QUANT_BLOCK + 44  # every special block of values_of, then a partial one
SIGNS = pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])


def _cuda():
    from numba import cuda

    return cuda


def device_slot(slot):
    cuda = _cuda()
    return precision.Quantized(cuda.to_device(slot.codes), cuda.to_device(slot.absmax), slot.signed)


def host_slot(slot):
    return precision.Quantized(slot.codes.copy_to_host(), slot.absmax.copy_to_host(), slot.signed)


def garbage_slot(n, signed):
    return empty_slot(n, signed)


@SIGNS
@pytest.mark.parametrize("n", [N, 1, 0])
def test_quantize_equals_numba_cpu(n, signed):
    values = values_of(n, signed, seed=3)
    want = garbage_slot(n, signed)
    block_loops.quantize_from(want, values)
    dv = _cuda().to_device(values)
    got = device_slot(garbage_slot(n, signed))
    block_cuda.quantize_from(got, dv)
    got = host_slot(got)
    assert got.codes.tobytes() == want.codes.tobytes()
    assert got.absmax.tobytes() == want.absmax.tobytes()
    assert dv.copy_to_host().tobytes() == values.tobytes()  # not modified
    if n == N:
        assert np.isnan(got.absmax[7]) and got.absmax[8] == np.inf  # the NaN and Inf blocks


@SIGNS
@pytest.mark.parametrize("n", [N, 1, 0])
def test_dequantize_equals_numba_cpu(n, signed):
    rng = np.random.default_rng(n)
    blocks = precision.int8_block_count(n)
    absmax = (10.0 ** rng.uniform(-38, 38, blocks)).astype(np.float32)
    absmax[1::4] = 0.0
    absmax[2::5] = np.nan
    absmax[3::7] = np.inf
    slot = precision.Quantized(rng.integers(0, 256, n, dtype=np.uint8), absmax, signed)
    want = np.full(n, 7.0, np.float32)
    block_loops.dequantize_into(slot, want)
    out = _cuda().to_device(np.full(n, 7.0, np.float32))
    block_cuda.dequantize_into(device_slot(slot), out)
    assert out.copy_to_host().tobytes() == want.tobytes()


def test_launch_configuration_and_backend_methods_give_the_same_bits():
    """One element per thread (256 threads), 3 blocks striding, and the backend's methods (the
    simulator's default launch, stream None) give the same bits."""
    backend = dispatch.get_backend("numba-cuda")
    values = values_of(N, True, seed=5)
    want = garbage_slot(N, True)
    block_loops.quantize_from(want, values)
    want_back = np.empty(N, np.float32)
    block_loops.dequantize_into(want, want_back)
    dv = _cuda().to_device(values)
    for launch in (dict(threads=256, blocks=3), dict(threads=64), None):
        slot = device_slot(garbage_slot(N, True))
        back = _cuda().to_device(np.zeros(N, np.float32))
        if launch is None:
            backend.quantize(slot, dv, stream=None)
            backend.dequantize(slot, back, stream=None)
        else:
            block_cuda.quantize_from(slot, dv, **launch)
            block_cuda.dequantize_into(slot, back, **launch)
        h = host_slot(slot)
        assert h.codes.tobytes() == want.codes.tobytes(), launch
        assert h.absmax.tobytes() == want.absmax.tobytes(), launch
        assert back.copy_to_host().tobytes() == want_back.tobytes(), launch


def test_bad_arguments_are_refused_before_any_launch():
    cuda = _cuda()
    slot = device_slot(garbage_slot(300, False))
    before = host_slot(slot)
    host_values = np.ones(300, np.float32)
    for fn, s, a, exc, match in (
        (block_cuda.quantize_from, slot, host_values, TypeError, "device array"),
        (block_cuda.quantize_from, before, cuda.to_device(host_values), TypeError, "device"),
        (
            block_cuda.quantize_from,
            slot,
            cuda.to_device(np.ones(299, np.float32)),
            ValueError,
            "300",
        ),
        (block_cuda.dequantize_into, slot, cuda.to_device(np.ones(300)), ValueError, "float32"),
        (
            block_cuda.dequantize_into,
            precision.Quantized(slot.codes, cuda.to_device(np.ones(3, np.float32)), False),
            cuda.to_device(host_values),
            ValueError,
            "one per block",
        ),
    ):
        with pytest.raises(exc, match=match):
            fn(s, a)
    with pytest.raises(ValueError, match="threads must divide 256"):
        block_cuda.quantize_from(slot, cuda.to_device(host_values), threads=100)
    after = host_slot(slot)
    assert after.codes.tobytes() == before.codes.tobytes()
    assert after.absmax.tobytes() == before.absmax.tobytes()
