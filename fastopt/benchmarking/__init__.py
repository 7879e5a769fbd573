"""Optimizer throughput benchmarks, shared by ``fastopt bench`` (the command line), the
pytest-benchmark suite in ``bench/`` and ``bench/report.py``.

Every case times fastopt's ``opt.step()`` and its peers IN THE SAME RUN, interleaved round by round
(the order rotates each round, so drift and noise hit every peer alike), and reports medians:

``roofline``       CPU: a kernel with the same loads/stores per element and trivial arithmetic, on
                   the very same parameter, gradient and state arrays (:mod:`.roofline`);
                   GPU: a device-to-device copy moving the same number of bytes
``numpy``          (CPU) the naive whole-array NumPy update (``fastopt.reference``), the obvious way
                   a user writes the algorithm in NumPy
``torch``          ``torch.optim.<Algo>()`` for an algorithm without foreach and fused flags (Muon)
``torch_foreach``  ``torch.optim.<Algo>(foreach=True)``, when torch is installed and has the
                   algorithm (on a GPU backend: torch CUDA tensors over the same device memory)
``torch_fused``    ``torch.optim.<Algo>(fused=True)``, when torch has a fused kernel for it
``single_param``   ("many" cases) fastopt over one parameter holding the same number of elements
``fastopt_list``   ("many" cases) fastopt over the same parameters as a list of separate arrays

For a single-parameter case torch gets the ParamSet's buffer as ONE tensor (sharing memory); in a
"many" case torch gets separately allocated tensors, as a torch model has; in a "matrices" case
(Muon) fastopt, NumPy and torch step the same matrices of one ParamSet.

Ratios: ``fraction_of_roofline`` = roofline time / fastopt time (1.0 = at the memory ceiling);
``speedup_vs[peer]`` = peer time / fastopt time (> 1: fastopt is faster);
``time_ratio_to[peer]`` = fastopt time / peer time.

One job per module:

:mod:`.settings`  default sizes and effort, the ``FASTOPT_BENCH_*`` environment, peer and backend names
:mod:`.cases`     the case catalogue and its speed goals (classes from ``fastopt.optim.OPTIMIZERS``)
:mod:`.roofline`  the roofline kernels and the bytes per element of a step
:mod:`.timing`    the interleaved timer (:func:`time_steps`, :func:`median_times`), host/CUDA clocks
:mod:`.peers`     fastopt's step and its peers over the same arrays, CPU and GPU
:mod:`.runner`    :func:`run_case` (one case: a JSON-serialisable dict) and :func:`run_suite`
:mod:`.report`    the results document (schema, pytest-benchmark conversion, loading), tables
:mod:`.charts`    the PNG bar chart

The names below are this package's API (``from fastopt import benchmarking`` then
``benchmarking.run_case(...)``). Machine facts live in :mod:`fastopt.machine`.
"""

from ..machine import machine_info
from .cases import (
    ADAM_GOALS,
    ALGORITHMS,
    BF16_ADAMW_GOALS,
    CASES,
    CASES_BY_NAME,
    MANY_GOALS,
    OTHER_GOALS,
    QUICK_CASES,
    TINY_GOALS,
    Case,
    Goal,
    check_goal,
    select_cases,
)
from .charts import CHART_PEERS, chart_panels, chart_size, plot_chart
from .report import (
    CASE_FIELDS,
    SCHEMA,
    fmt_num,
    fmt_si,
    fmt_time,
    format_table,
    from_pytest_benchmark,
    load_results,
    markdown,
    table_rows,
    validate_results,
    write_outputs,
)
from .runner import gpu_backends, run_case, run_suite
from .settings import (
    CPU_BACKEND,
    DEFAULT_MANY,
    DEFAULT_MIN_TIME,
    DEFAULT_N,
    DEFAULT_REPEATS,
    GPU_BACKENDS,
    PEERS,
    WARMUP_STEPS,
    env_many,
    env_min_time,
    env_n,
    env_repeats,
)
from .timing import CudaEventTimer, PerfCounterTimer, median_times, time_steps

__all__ = [
    "ADAM_GOALS",
    "ALGORITHMS",
    "BF16_ADAMW_GOALS",
    "CASES",
    "CASES_BY_NAME",
    "CASE_FIELDS",
    "CHART_PEERS",
    "CPU_BACKEND",
    "DEFAULT_MANY",
    "DEFAULT_MIN_TIME",
    "DEFAULT_N",
    "DEFAULT_REPEATS",
    "GPU_BACKENDS",
    "MANY_GOALS",
    "OTHER_GOALS",
    "PEERS",
    "QUICK_CASES",
    "SCHEMA",
    "TINY_GOALS",
    "WARMUP_STEPS",
    "Case",
    "CudaEventTimer",
    "Goal",
    "PerfCounterTimer",
    "chart_panels",
    "chart_size",
    "check_goal",
    "env_many",
    "env_min_time",
    "env_n",
    "env_repeats",
    "format_table",
    "fmt_num",
    "fmt_si",
    "fmt_time",
    "from_pytest_benchmark",
    "gpu_backends",
    "load_results",
    "machine_info",
    "markdown",
    "median_times",
    "plot_chart",
    "run_case",
    "run_suite",
    "select_cases",
    "table_rows",
    "time_steps",
    "validate_results",
    "write_outputs",
]
