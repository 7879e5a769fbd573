"""``fastopt bench``: the optimizer throughput report (table, JSON, Markdown, PNG chart)."""

import decimal
import fractions
import re
import sys

from . import UsageError, split_list

HELP = "optimizer throughput vs the roofline kernel and NumPy/torch peers"
DESCRIPTION = """\
Time opt.step() of every algorithm at several sizes, float32 and float64 (or bfloat16 and float16
storage: parameters, gradients and state in 16 bits), on the CPU and on every available GPU
backend, next to a roofline kernel (the same memory traffic, trivial arithmetic, on
the same arrays; on a GPU a device-to-device copy of the same bytes) and the peers installed here
(naive NumPy, torch.optim with foreach=True and fused=True). Every peer is timed in the same run,
round by round; medians are reported.

Prints a table (time/step, elements/s, GB/s, fraction of roofline, speedup vs each peer) and
writes PREFIX.json (every number; schema in fastopt.benchmarking), PREFIX.md and PREFIX.png (a
bar chart, with matplotlib). The cases are those of the pytest-benchmark suite in bench/;
--from-json turns that suite's JSON (pytest bench/ --benchmark-json=FILE) into the same report.

Numbers from a machine shared with other work mean little: check the spread column (slowest /
fastest round; above 1.1 is noise)."""
EPILOG = """\
examples:
  fastopt bench --quick                           # one case per algorithm, 1 Mi float32: < 1 min
  fastopt bench                                   # every case, 64Ki/1Mi/16Mi, float32+float64
  fastopt bench --algorithms adam,sgd --sizes 1Mi,16Mi --dtypes float32
  fastopt bench --cases adamw --sizes 16Mi --dtypes bfloat16 --goals   # bf16 AdamW vs torch fused
  fastopt bench --cases adam_many --many 1000x1000 --repeats 9
  fastopt bench --backends cupy --out results/h100
  pytest bench/ --benchmark-json=out.json && fastopt bench --from-json out.json

sizes: plain integers or with a suffix: k/M/G (10^3, 10^6, 10^9), Ki/Mi/Gi (2^10, 2^20, 2^30);
at most 2Gi.
"""

DEFAULT_MANY = "1000x1000"
QUICK = {"sizes": "1Mi", "dtypes": "float32", "repeats": 3, "min_time": 0.03}
FULL = {"sizes": "64Ki,1Mi,16Mi", "dtypes": "float32,float64", "repeats": 5, "min_time": 0.1}
MAX_SIZE = 2**31
"""The largest ``--sizes`` value: 2Gi elements, 8 GiB per float32 array (a case holds the
parameters, gradients and state, and the peers' copies)."""
_SUFFIX = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
}


def add_arguments(p):
    what = p.add_argument_group("what to run")
    what.add_argument(
        "--quick",
        action="store_true",
        help="one case per algorithm, 1Mi elements, float32, 3 rounds of 0.03 s (under a minute)",
    )
    what.add_argument(
        "--algorithms", metavar="LIST", help="algorithms, e.g. adam,sgd (all cases of each)"
    )
    what.add_argument(
        "--cases", metavar="LIST", help="case names, e.g. adam,sgd_nesterov,adam_many"
    )
    what.add_argument(
        "--sizes", metavar="LIST", help=f"elements per case (default {FULL['sizes']})"
    )
    what.add_argument(
        "--dtypes",
        metavar="LIST",
        help="storage dtypes of parameters, gradients and state: float32, float64, bfloat16 "
        f"(bf16), float16 (fp16) (default {FULL['dtypes']})",
    )
    what.add_argument(
        "--backends",
        metavar="LIST",
        help="numba-cpu (or cpu), cupy, numba-cuda, gpu (every available GPU backend); "
        "default: numba-cpu and every available GPU backend",
    )
    what.add_argument(
        "--many",
        metavar="COUNTxSIZE",
        help=f"layout of the many-parameter case (default {DEFAULT_MANY})",
    )
    what.add_argument(
        "--peers",
        metavar="LIST",
        help="peers to time (default all): roofline,numpy,torch,torch_foreach,torch_fused,"
        "single_param,fastopt_list",
    )
    how = p.add_argument_group("how")
    how.add_argument(
        "--repeats", type=int, metavar="N", help=f"timed rounds (default {FULL['repeats']})"
    )
    how.add_argument(
        "--min-time",
        type=float,
        metavar="S",
        help=f"seconds per round and peer (default {FULL['min_time']})",
    )
    how.add_argument("--threads", type=int, metavar="N", help="Numba threads (torch gets the same)")
    out = p.add_argument_group("output")
    out.add_argument(
        "--out",
        metavar="PREFIX",
        help="write PREFIX.json, PREFIX.md, PREFIX.png (default fastopt-bench; with --from-json, "
        "FILE's name without .json plus -report)",
    )
    out.add_argument("--no-chart", action="store_true", help="do not write the PNG chart")
    out.add_argument("--goals", action="store_true", help="also print the speed goals' checks")
    out.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    out.add_argument(
        "--from-json",
        metavar="FILE",
        help="run nothing: report a fastopt bench JSON or a pytest-benchmark JSON of bench/",
    )


def parse_size(text):
    """Elements per case from one ``--sizes`` item: a whole number in 1..:data:`MAX_SIZE`."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kKmMgG]i?)?\s*", text)
    if not m:
        raise UsageError(f"--sizes: {text!r} is not a size (e.g. 65536, 1M, 16Mi)")
    number, suffix = m.groups()
    # exact (a float overflows at 1e400 and rounds 1.0000000000000001e3), and the exponent
    # bounded first: 1e999999999 would build a billion-digit integer
    mantissa = decimal.Decimal(number)
    if not mantissa.is_zero() and mantissa.adjusted() > 18:
        value = MAX_SIZE + 1
    else:
        value = fractions.Fraction(mantissa) * _SUFFIX[(suffix or "").lower()]
    if value.denominator != 1 or value < 1:
        raise UsageError(f"--sizes: {text!r} is not a whole number of elements >= 1")
    if value > MAX_SIZE:
        raise UsageError(
            f"--sizes: {text.strip()!r} is too large: at most {MAX_SIZE} (2Gi) elements per case"
        )
    return int(value)


MAX_MANY_COUNT = 1_000_000
"""The most tensors in ``--many``: each one costs Python objects (a view, a name) on top of its
elements."""


def parse_many(text):
    """``(count, size)`` from ``--many COUNTxSIZE``: 1..:data:`MAX_MANY_COUNT` tensors of ``size``
    elements, at most :data:`MAX_SIZE` elements in all (as ``--sizes``)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or not any(c != "0" for c in m.group(1)) or not any(c != "0" for c in m.group(2)):
        raise UsageError(f"--many: {text!r} is not COUNTxSIZE (e.g. 1000x1000)")
    if any(len(g.lstrip("0")) > 18 for g in m.groups()):  # before int(), which caps digits
        raise UsageError(
            f"--many: {text.strip()!r} is too large: at most {MAX_SIZE} (2Gi) elements"
        )
    count, size = int(m.group(1)), int(m.group(2))
    if count > MAX_MANY_COUNT:
        raise UsageError(f"--many: {count} tensors is too many: at most {MAX_MANY_COUNT}")
    if count * size > MAX_SIZE:
        raise UsageError(
            f"--many: {text.strip()!r} is {count * size} elements in all, too large: at most "
            f"{MAX_SIZE} (2Gi)"
        )
    return count, size


def _dtype(text):
    """The storage dtype name of one ``--dtypes`` item (``bf16`` -> ``bfloat16``)."""
    from .. import arrays

    try:
        return arrays.storage_dtype(text.lower()).name
    except ValueError:
        raise UsageError(
            f"--dtypes: {text!r} is not float32, float64, bfloat16 (bf16) or float16 (fp16)"
        ) from None


def _backends(text):
    from ..benchmarking import CPU_BACKEND, gpu_backends

    if text is None:
        return [CPU_BACKEND] + [name for name, ok, _ in gpu_backends() if ok]
    wanted = split_list(text, "--backends")
    gpus = gpu_backends(requested=wanted)
    status = {name: (ok, why) for name, ok, why in gpus}
    chosen = []
    for name in wanted:
        name = name.lower()
        if name in ("cpu", CPU_BACKEND):
            chosen.append(CPU_BACKEND)
        elif name == "gpu":
            avail = [n for n, (ok, _) in status.items() if ok]
            if not avail:
                reasons = "; ".join(f"{n}: {why}" for n, (_, why) in status.items())
                raise UsageError(f"--backends gpu: no GPU backend is available ({reasons})")
            chosen += avail
        elif name in status:
            ok, why = status[name]
            if not ok:
                raise UsageError(f"--backends: {name} is not available: {why}")
            chosen.append(name)
        else:
            raise UsageError(
                f"--backends: unknown backend {name!r}; known: numba-cpu (cpu), cupy, numba-cuda, gpu"
            )
    return list(dict.fromkeys(chosen))


def _progress(i, total, label, res, err):
    from ..benchmarking import fmt_num, fmt_time

    head = f"[{i:>{len(str(total))}}/{total}] {label}: "
    if err is not None:
        print(head + f"not run: {err}", file=sys.stderr, flush=True)
        return
    print(
        head + f"{fmt_time(res['median_s'])}/step, {fmt_num(res['gb_per_s'])} GB/s, "
        f"{fmt_num(res.get('fraction_of_roofline'))} of roofline",
        file=sys.stderr,
        flush=True,
    )


def _print_goals(doc):
    print("\nspeed goals (meant for full-size runs on a quiet machine):")
    for g in doc["goals"]:
        value = "-" if g["value"] is None else f"{g['value']:.3g}"
        print(
            f"  {g['status']:>7}  {g['case']} {g.get('dtype', '')} {g.get('backend', '')}: "
            f"{g['goal']} (value {value})"
        )


RUN_OPTIONS = (
    "algorithms",
    "cases",
    "sizes",
    "dtypes",
    "backends",
    "many",
    "peers",
    "repeats",
    "min_time",
    "threads",
)
"""Options that only apply to a run (refused with ``--from-json``)."""


def _option(name):
    return "--" + name.replace("_", "-")


def _list(args, name, default=None):
    """The items of a list option (``--sizes``): its default when not given, UsageError for an
    empty value (an unset shell variable must not mean 'everything')."""
    text = getattr(args, name)
    if text is None:
        return None if default is None else split_list(default, _option(name))
    if not text.strip():
        raise UsageError(f"{_option(name)}: empty; give a comma-separated list or leave it out")
    return split_list(text, _option(name))


def _check_outputs(prefix, chart):
    from ..benchmarking.report import check_outputs
    from ..fileio import OutputError

    try:  # before any work: every file, and the folder that will hold them
        check_outputs(prefix, chart=chart)
    except OutputError as exc:
        raise UsageError(f"--out: {exc}") from None


def run(args):
    from .. import benchmarking as B

    stdout_unicode = (sys.stdout.encoding or "").lower().replace("-", "") in ("utf8", "utf16")
    if args.from_json is not None:
        given = [_option(k) for k in RUN_OPTIONS if getattr(args, k) is not None]
        if args.quick:
            given.insert(0, "--quick")
        if given:
            raise UsageError(
                f"--from-json reports an existing JSON: it takes no run options ({', '.join(given)})"
            )
        try:
            doc = B.load_results(args.from_json)
        except ValueError as exc:
            raise UsageError(f"--from-json: {exc}") from None
        prefix = args.out
        if prefix is None:
            src = str(args.from_json)
            prefix = (src[:-5] if src.lower().endswith(".json") else src) + "-report"
    else:
        doc = None
        prefix = "fastopt-bench" if args.out is None else args.out
    chart = not args.no_chart
    if chart:
        from . import require_matplotlib

        try:
            require_matplotlib("the chart")
        except Exception as exc:
            print(f"fastopt bench: note: {exc}; writing no chart", file=sys.stderr)
            chart = False
    _check_outputs(prefix, chart)

    if doc is None:
        defaults = QUICK if args.quick else FULL
        sizes = [parse_size(s) for s in _list(args, "sizes", defaults["sizes"])]
        dtypes = [_dtype(d) for d in _list(args, "dtypes", defaults["dtypes"])]
        try:
            cases = B.select_cases(
                algorithms=_list(args, "algorithms"), names=_list(args, "cases"), quick=args.quick
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if not cases:
            raise UsageError("no case matches --algorithms/--cases")
        repeats = defaults["repeats"] if args.repeats is None else args.repeats
        if repeats < 1:
            raise UsageError(f"--repeats must be >= 1, got {repeats}")
        min_time = defaults["min_time"] if args.min_time is None else args.min_time
        if not min_time > 0 or min_time > 60:
            raise UsageError(f"--min-time must be in (0, 60] seconds, got {min_time}")
        peers = _list(args, "peers")
        if peers is not None:
            bad = [x for x in peers if x not in B.PEERS]
            if bad:
                raise UsageError(f"--peers: unknown peer {bad[0]!r}; known: {', '.join(B.PEERS)}")
        many = parse_many(DEFAULT_MANY if args.many is None else args.many)
        if args.backends is not None and not args.backends.strip():
            raise UsageError("--backends: empty; give a comma-separated list or leave it out")
        backends = _backends(args.backends)
        if args.threads is not None:
            import numba

            top = numba.config.NUMBA_NUM_THREADS
            if not 1 <= args.threads <= top:
                raise UsageError(
                    f"--threads must be in 1..{top} (NUMBA_NUM_THREADS), got {args.threads}"
                )
            numba.set_num_threads(args.threads)
        doc = B.run_suite(
            cases,
            sizes=sizes,
            dtypes=dtypes,
            backends=backends,
            many=many,
            repeats=repeats,
            min_time=min_time,
            peers=peers,
            quick=args.quick,
            progress=None if args.quiet else _progress,
        )

    print(B.format_table(doc, unicode=stdout_unicode), end="")
    if args.goals:
        _print_goals(doc)
    try:
        written = B.write_outputs(doc, prefix, chart=chart)
    except OSError as exc:
        raise UsageError(f"--out: cannot write {prefix}.*: {exc.strerror or exc}") from None
    files = [written[k] for k in ("json", "md", "png") if k in written]
    print("\nwrote " + ", ".join(files))
    if "chart_skipped" in written:
        print(f"no chart: {written['chart_skipped']}", file=sys.stderr)
    return 0
