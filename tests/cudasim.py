"""Settings of a process that runs kernels in numba-cuda's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``):
``prepare()`` is called by ``conftest.py`` in the simulator runs and by the tests' simulator child
processes, after the environment is set and before the first launch.

Two things about the simulator make its runs slow or flaky, and neither is fastopt's kernels:

- It runs each CUDA thread of a block as a Python thread, started one after the other: starting the
  k-th waits for the GIL behind the k - 1 already running, each of which may keep it a whole switch
  interval (5 ms), so a block's start costs about k^2 / 2 intervals. At 0.2 ms a simulator run took
  half the time (the int8 and dispatch modules: 96-102 s against 202-206 s, interleaved).
- ``cuda.shared.array`` looks up the block's array for its source line and creates it when absent,
  without a lock (numba-cuda 0.26 to 0.30 at least): two threads of a block that both find it absent
  each create an array of their own, uninitialised, and the block's tree reduction then adds what
  another thread never wrote. The shorter switch interval made that likely enough to be seen: the
  L-BFGS simulator test failed once in 30 runs on a loaded machine, and 400 runs of the vector
  reductions gave 7 wrong sums. ``prepare()`` makes the lookup and the creation one step under a lock.
"""

import sys
import threading

SWITCH_INTERVAL_S = 2e-4

_LOCK = threading.Lock()


def prepare():
    """Shorten the interpreter's switch interval and make the simulator's shared-array allocation
    atomic (idempotent; a no-op for the allocation outside the simulator)."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    from numba import config

    if not config.ENABLE_CUDASIM:
        return
    from numba.cuda.simulator import kernelapi

    shared = kernelapi.FakeCUDAShared
    if not getattr(shared.array, "fastopt_atomic", False):
        shared.array = _atomic_array(shared.array, kernelapi)


def _atomic_array(original, kernelapi):
    """``FakeCUDAShared.array`` with the lookup and the creation under one lock; the same key
    (the caller's file and line) and the same array as ``original`` otherwise."""
    from numba.core import types
    from numba.np import numpy_support

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:
            # dynamic shared memory (one buffer made up front) and the alignment refusal: no lookup
            return original(self, shape, dtype, alignment)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with _LOCK:
            res = self._allocations.get(key)
            if res is None:
                res = self._allocations[key] = kernelapi.np.empty(shape, dtype)
        return res

    array.fastopt_atomic = True
    return array
