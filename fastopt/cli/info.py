"""``fastopt info``: versions, Numba threading, backends and GPUs."""

import json

HELP = "versions, Numba threading layer and threads, backends and GPUs"
DESCRIPTION = """\
Print what fastopt runs on here: the versions of fastopt, Python, NumPy, Numba and llvmlite and of
the optional packages (torch, CuPy, numba-cuda, mpi4py, matplotlib, scikit-learn, tqdm); Numba's
threading layer (the one in use and those available: tbb or omp are thread-safe, workqueue is not)
and thread count; every backend, with what it runs on or why it is unavailable; and the CUDA
GPUs."""
EPILOG = """\
examples:
  fastopt info
  fastopt info --json > env.json      # the same as JSON (fields: fastopt.machine.environment)
"""


def add_arguments(p):
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _yes(b):
    return "yes" if b else "no"


def format_info(env):
    v = env["versions"]
    nb = env["numba"]
    py = env["python"]
    cpu = env["cpu"]
    lines = [
        f"fastopt     {env['fastopt']}",
        f"Python      {py['version']} ({py['implementation']}) {py['executable']}",
        f"platform    {env['platform']}",
        f"CPU         {cpu['model']}; {cpu['logical_cores']} logical cores "
        f"({cpu['usable_cores']} usable)",
        "",
        "versions",
    ]
    width = max(len(k) for k in v)
    for name, ver in v.items():
        lines.append(f"  {name.ljust(width)}  {ver if ver else 'not installed'}")
    layers = ", ".join(f"{k} {_yes(ok)}" for k, ok in nb["available_layers"].items())
    lines += [
        "",
        "Numba",
        f"  threading layer  {nb['threading_layer']} (configured: {nb['configured_layer']}; "
        f"available: {layers})",
        f"  threads          {'unknown' if nb['threads'] is None else nb['threads']} "
        f"(NUMBA_NUM_THREADS={nb['NUMBA_NUM_THREADS']})",
    ]
    if nb["threading_layer"].startswith("unavailable"):
        lines.append(
            "  problem          no threading layer can start: the CPU kernels will fail; install "
            "the configured layer or change NUMBA_THREADING_LAYER"
        )
    if nb["threading_layer"] == "workqueue":
        lines.append(
            "  note             workqueue is not thread-safe: step() from several Python threads "
            "at once aborts; install tbb or use an OpenMP build for the omp layer"
        )
    if nb.get("cuda_simulator"):
        lines.append("  CUDA simulator   on (NUMBA_ENABLE_CUDASIM=1): numba-cuda runs on the CPU")
    lines += ["", "backends"]
    width = max(len(b["name"]) for b in env["backends"])
    for b in env["backends"]:
        state = "available  " if b["available"] else "unavailable"
        lines.append(f"  {b['name'].ljust(width)}  {state}  {b['detail']}".rstrip())
    lines += ["", "GPUs"]
    if env["gpus"]:
        for g in env["gpus"]:
            lines.append(
                f"  {g['index']}: {g['name']}, {g['memory_gib']} GiB, compute capability "
                f"{g['compute_capability']} (via {g['via']})"
            )
    else:
        lines.append("  none found")
    return "\n".join(lines) + "\n"


def run(args):
    from ..machine import environment

    env = environment()
    if args.json:
        print(json.dumps(env, indent=1))
    else:
        print(format_info(env), end="")
    return 0
