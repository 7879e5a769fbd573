"""How the benchmarks run: default sizes and effort, the environment variables that override them,
the peer names and the backend names.

Sizes and effort of the pytest suite in ``bench/`` come from the environment, so quick runs need no
code change: ``FASTOPT_BENCH_N`` (elements of a single-parameter case, default 16 Mi = 16777216),
``FASTOPT_BENCH_MANY`` (``COUNTxSIZE`` of the many-parameter case, default ``1000x1000``),
``FASTOPT_BENCH_REPEATS`` (timed rounds, default 7), ``FASTOPT_BENCH_MIN_TIME`` (seconds per
round per peer, default 0.2; each round runs as many steps as fill it). ``fastopt bench`` passes
them as arguments instead.
"""

import os

DEFAULT_N = 16 * 1024 * 1024
DEFAULT_MANY = (1000, 1000)
DEFAULT_REPEATS = 7
DEFAULT_MIN_TIME = 0.2
WARMUP_STEPS = 3

PEERS = (
    "roofline", "numpy", "torch", "torch_foreach", "torch_fused", "single_param", "fastopt_list",
)  # fmt: skip
"""Everything a case can be timed against (see :mod:`fastopt.benchmarking`)."""

CPU_BACKEND = "numba-cpu"
GPU_BACKENDS = ("cupy", "numba-cuda")


def env_n():
    """Elements of a single-parameter case: ``FASTOPT_BENCH_N`` or :data:`DEFAULT_N`."""
    return int(os.environ.get("FASTOPT_BENCH_N", DEFAULT_N))


def env_many():
    """(count, size) of the many-parameter case: ``FASTOPT_BENCH_MANY`` (``COUNTxSIZE``) or
    :data:`DEFAULT_MANY`."""
    spec = os.environ.get("FASTOPT_BENCH_MANY")
    if not spec:
        return DEFAULT_MANY
    count, size = spec.lower().split("x")
    return int(count), int(size)


def env_repeats():
    """Timed rounds: ``FASTOPT_BENCH_REPEATS`` or :data:`DEFAULT_REPEATS`."""
    return int(os.environ.get("FASTOPT_BENCH_REPEATS", DEFAULT_REPEATS))


def env_min_time():
    """Seconds per round and peer: ``FASTOPT_BENCH_MIN_TIME`` or :data:`DEFAULT_MIN_TIME`."""
    return float(os.environ.get("FASTOPT_BENCH_MIN_TIME", DEFAULT_MIN_TIME))
