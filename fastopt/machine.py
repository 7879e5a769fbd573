"""Facts about the machine fastopt runs on: library versions, CPU model and cores, Numba's
threading layer and threads, the backends and the CUDA GPUs.

``fastopt info`` prints :func:`environment`; benchmark reports record :func:`machine_info`.
Nothing here imports the benchmark machinery, and the GPU libraries are asked only inside
:func:`gpu_info` (never at import).
"""

import importlib
import importlib.metadata
import os
import platform
import sys

import numpy as np

from . import __version__
from .dispatch import backends

OPTIONAL_PACKAGES = (
    "torch",
    "cupy",
    "numba-cuda",
    "mpi4py",
    "matplotlib",
    "scikit-learn",
    "tqdm",
)
"""Distributions ``fastopt info`` reports the version of (None where not installed)."""


def package_version(name):
    """Installed version of a distribution (``cupy`` matches ``cupy-cuda12x`` etc.), or None.
    Reads package metadata only: nothing is imported."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
    if name == "cupy":
        for dist in importlib.metadata.distributions():
            dname = (dist.metadata.get("Name") or "").lower()
            if dname.startswith("cupy"):
                return f"{dist.version} ({dname})"
    return None


def usable_cores():
    """Cores this process may run on (its CPU affinity), or None where the OS does not say."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def threading_layers():
    """{layer: available?} for Numba's threading layers (tbb, omp, workqueue)."""
    out = {}
    for layer, module in (("tbb", "tbbpool"), ("omp", "omppool"), ("workqueue", "workqueue")):
        try:
            importlib.import_module(f"numba.np.ufunc.{module}")
            out[layer] = True
        except Exception:
            out[layer] = False
    return out


def gpu_info():
    """[{index, name, memory_gib, compute_capability, via}] of the CUDA GPUs, asked of CuPy, then
    numba.cuda, then torch; [] when none answers. Never raises."""
    try:
        import cupy

        out = []
        for i in range(cupy.cuda.runtime.getDeviceCount()):
            p = cupy.cuda.runtime.getDeviceProperties(i)
            name = p["name"].decode() if isinstance(p["name"], bytes) else str(p["name"])
            out.append(
                {
                    "index": i,
                    "name": name,
                    "memory_gib": round(p["totalGlobalMem"] / 2**30, 1),
                    "compute_capability": f"{p['major']}.{p['minor']}",
                    "via": "cupy",
                }
            )
        if out:
            return out
    except Exception:
        pass
    try:
        if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
            from numba import cuda

            if cuda.is_available():
                out = []
                for gpu in cuda.gpus:
                    with gpu:
                        ctx = cuda.current_context()
                        free, total = ctx.get_memory_info()
                        name = gpu.name.decode() if isinstance(gpu.name, bytes) else str(gpu.name)
                        out.append(
                            {
                                "index": int(gpu.id),
                                "name": name,
                                "memory_gib": round(total / 2**30, 1),
                                "compute_capability": ".".join(map(str, gpu.compute_capability)),
                                "via": "numba.cuda",
                            }
                        )
                if out:
                    return out
    except Exception:
        pass
    try:
        version = package_version("torch")
        if version is not None and "+cpu" not in version:  # a CPU-only build: skip the import
            import torch

            if torch.cuda.is_available():
                out = []
                for i in range(torch.cuda.device_count()):
                    p = torch.cuda.get_device_properties(i)
                    out.append(
                        {
                            "index": i,
                            "name": p.name,
                            "memory_gib": round(p.total_memory / 2**30, 1),
                            "compute_capability": f"{p.major}.{p.minor}",
                            "via": "torch",
                        }
                    )
                return out
    except Exception:
        pass
    return []


def cpu_model():
    """The CPU's model name (``/proc/cpuinfo``; else what :mod:`platform` knows)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model


def machine_info(gpus=False):
    """CPU model, cores, Numba threading layer and threads, library versions (and, with
    ``gpus=True``, the CUDA GPUs and the backends' availability)."""
    import numba

    from .kernels import cpu

    info = {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_threading_layer": cpu.threading_layer(),
        "numba_threads": numba.get_num_threads(),
        "fastopt": __version__,
        "torch": None,
        "torch_threads": None,
    }
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    if gpus:
        info["gpus"] = gpu_info()
        info["backends"] = [
            {"name": name, "available": ok, "detail": why} for name, ok, why in backends()
        ]
    return info


def environment():
    """Everything ``fastopt info`` reports, as a JSON-serialisable dict:

    ``fastopt``, ``python`` (version, implementation, executable), ``platform``, ``cpu``
    (model, logical_cores, usable_cores), ``versions`` (numpy, numba, llvmlite and each of
    :data:`OPTIONAL_PACKAGES`: None when not installed), ``numba`` (threading layer in use,
    configured layer, available layers, threads, NUMBA_NUM_THREADS, cuda_simulator; when no
    layer can start, the layer is ``"unavailable (REASON)"`` and threads None),
    ``backends`` ([{name, available, detail}]: what it runs on, or why it is unavailable) and
    ``gpus`` (see :func:`gpu_info`).
    """
    import llvmlite
    import numba

    from .kernels import cpu

    try:
        layer = cpu.threading_layer()
    except Exception as exc:  # no layer can start (NUMBA_THREADING_LAYER=tbb without TBB ...)
        layer = f"unavailable ({type(exc).__name__}: {' '.join(str(exc).split())})"
    try:  # starts the thread pool: fails as the layer did
        threads = numba.get_num_threads()
    except Exception:
        threads = None
    versions = {"numpy": np.__version__, "numba": numba.__version__}
    versions["llvmlite"] = llvmlite.__version__
    for name in OPTIONAL_PACKAGES:
        versions[name] = package_version(name)
    return {
        "fastopt": __version__,
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "platform": platform.platform(),
        "cpu": {
            "model": cpu_model(),
            "logical_cores": os.cpu_count(),
            "usable_cores": usable_cores(),
        },
        "versions": versions,
        "numba": {
            "threading_layer": layer,
            "configured_layer": numba.config.THREADING_LAYER,
            "available_layers": threading_layers(),
            "threads": threads,
            "NUMBA_NUM_THREADS": numba.config.NUMBA_NUM_THREADS,
            "cuda_simulator": os.environ.get("NUMBA_ENABLE_CUDASIM") == "1",
        },
        "backends": [
            {"name": name, "available": ok, "detail": why} for name, ok, why in backends()
        ],
        "gpus": gpu_info(),
    }
