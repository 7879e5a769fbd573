"""The results document: its schema, the conversion of a pytest-benchmark JSON of ``bench/``,
loading and validation, and its text and Markdown tables; :func:`write_outputs` writes the
JSON, Markdown and PNG chart of one document.

A results document (``fastopt bench`` JSON, and what :func:`from_pytest_benchmark` makes of a
``pytest bench/ --benchmark-json`` file) is a dict with

``schema``     ``"fastopt-bench/1"``
``date``, ``datetime``   when it ran (ISO 8601; ``datetime`` may be None for old pytest JSON)
``source``     ``"fastopt bench"`` or the path of the pytest-benchmark JSON it came from
``machine``    :func:`fastopt.machine.machine_info` where it ran (CPU, cores, versions,
               threading layer, GPUs)
``machine_collected_at_report_time``  True when the JSON lacked it and it was collected later
``commit_info``  pytest-benchmark's commit info, or None
``settings``   how it ran: sizes, dtypes, backends, repeats, min_time_s, quick (None for pytest)
``cases``      one :func:`fastopt.benchmarking.run_case` result per (backend, dtype, size, case);
               see :data:`CASE_FIELDS` for the fields every one has
``goals``      every case's goal checks: case, backend, dtype, goal, metric, op, threshold, text,
               value, status (pass/fail/skipped), reason
``errors``     (backend, dtype, elements, case, reason) of combinations that could not run
"""

import datetime as dt
import errno
import json
import os
import pathlib
import stat

from ..fileio import OutputError, check_output, write_text
from ..machine import machine_info, package_version
from .charts import plot_chart
from .settings import CPU_BACKEND

SCHEMA = "fastopt-bench/1"

CASE_FIELDS = (
    "case",
    "algorithm",
    "kwargs",
    "layout",
    "backend",
    "dtype",
    "elements",
    "params",
    "state_slots",
    "bytes_per_element",
    "median_s",
    "us_per_step",
    "elements_per_s",
    "gb_per_s",
    "fraction_of_roofline",
    "roofline_gb_per_s",
    "speedup_vs",
    "time_ratio_to",
    "timings",
    "skipped_peers",
    "best_of_repeats",
    "goals",
)
"""Keys of every case result (:func:`fastopt.benchmarking.run_case`); ratios are None where a
peer did not run."""


def goal_rows(results):
    """The ``goals`` list of a results document: every goal check of every case result, with the
    case, backend and dtype it belongs to."""
    return [
        {"case": c["case"], "backend": c.get("backend", CPU_BACKEND), "dtype": c["dtype"], **g}
        for c in results
        for g in c.get("goals", [])
    ]


def from_pytest_benchmark(data, source):
    """The results document of a ``pytest bench/ --benchmark-json=FILE`` JSON (already loaded).

    The numbers come from each benchmark's ``extra_info`` (:func:`fastopt.benchmarking.run_case`: fastopt and its peers
    timed in one interleaved run); pytest-benchmark's own statistics of the fastopt step are kept
    per case under ``pytest_benchmark``. Machine details come from the JSON (recorded where it
    ran, by ``bench/conftest.py``); if absent they are collected now and marked as such.
    """
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    benchmarks = data.get("benchmarks", [])
    if not isinstance(benchmarks, list):
        raise ValueError("'benchmarks' is not a list")
    cases = []
    for i, b in enumerate(benchmarks):
        if not isinstance(b, dict):
            raise ValueError(f"benchmarks[{i}] is not an object")
        info = b.get("extra_info") or {}
        if not isinstance(info, dict):
            raise ValueError(f"benchmarks[{i}].extra_info is not an object")
        if "case" not in info:  # another benchmark of bench/ (not a case of the catalogue)
            continue
        _check_case(info, f"benchmarks[{i}].extra_info", pytest_row=True)
        row = dict(info)
        row.setdefault("backend", CPU_BACKEND)
        st = b.get("stats") or {}
        if not isinstance(st, dict):
            raise ValueError(f"benchmarks[{i}].stats is not an object")
        row["pytest_benchmark"] = {
            "name": b.get("fullname"),
            "median_s": st.get("median"),
            "mean_s": st.get("mean"),
            "stddev_s": st.get("stddev"),
            "min_s": st.get("min"),
            "rounds": st.get("rounds"),
            "iterations": st.get("iterations"),
        }
        cases.append(row)
    mi = data.get("machine_info") or {}
    if not isinstance(mi, dict):
        raise ValueError("'machine_info' is not an object")
    mi = mi.get("fastopt_bench")
    if mi is not None and not isinstance(mi, dict):
        raise ValueError("'machine_info.fastopt_bench' is not an object")
    collected_now = mi is None
    machine = machine_info() if collected_now else dict(mi)
    when = data.get("datetime")
    try:
        stamp = dt.datetime.fromisoformat(when) if when else dt.datetime.now(dt.timezone.utc)
    except (TypeError, ValueError):
        raise ValueError(f"'datetime' {when!r} is not an ISO 8601 date and time") from None
    date = stamp.date()
    return {
        "schema": SCHEMA,
        "date": date.isoformat(),
        "datetime": when,
        "source": str(source),
        "machine": machine,
        "machine_collected_at_report_time": collected_now,
        "commit_info": data.get("commit_info"),
        "pytest_benchmark_version": data.get("version"),
        "settings": None,
        "cases": cases,
        "goals": goal_rows(cases),
        "errors": [],
    }


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check(ok, where, what):
    if not ok:
        raise ValueError(f"{where} is not {what}")


def _check_number_or_none(value, where):
    _check(value is None or _is_number(value), where, "a number or null")


def _check_goal(g, where):
    _check(isinstance(g, dict), where, "an object")
    for key in ("goal", "status"):
        if key not in g:
            raise ValueError(f"{where} lacks {key}")
    _check(isinstance(g["goal"], str), f"{where}.goal", "a string")
    _check(g["status"] in ("pass", "fail", "skipped"), f"{where}.status", "pass, fail or skipped")
    _check_number_or_none(g.get("value"), f"{where}.value")


def _check_case(c, where, *, pytest_row=False):
    """ValueError naming the first field of the case result ``c`` that is missing or of the wrong
    type (``pytest_row``: an ``extra_info`` of pytest-benchmark, which may lack the backend)."""
    _check(isinstance(c, dict), where, "an object")
    missing = [k for k in CASE_FIELDS if k not in c and not (pytest_row and k == "backend")]
    if missing:
        more = f" and {len(missing) - 4} more fields" if len(missing) > 5 else ""
        raise ValueError(f"{where} lacks {', '.join(missing[:4] if more else missing)}{more}")
    for key in ("case", "dtype") + (("backend",) if "backend" in c else ()):
        _check(isinstance(c[key], str) and c[key], f"{where}.{key}", "a non-empty string")
    for key in ("elements", "params"):
        _check(
            isinstance(c[key], int) and not isinstance(c[key], bool) and c[key] >= 1,
            f"{where}.{key}",
            "a whole number >= 1",
        )
    _check(
        _is_number(c["bytes_per_element"]) and c["bytes_per_element"] > 0,
        f"{where}.bytes_per_element",
        "a number > 0",
    )
    median = c["median_s"]
    _check(
        _is_number(median) and 0 < median < float("inf"),
        f"{where}.median_s",
        "a number of seconds > 0",
    )
    for key in ("us_per_step", "elements_per_s", "gb_per_s"):
        _check(_is_number(c[key]), f"{where}.{key}", "a number")
    for key in ("fraction_of_roofline", "roofline_gb_per_s"):
        _check_number_or_none(c[key], f"{where}.{key}")
    for key in ("speedup_vs", "time_ratio_to", "timings", "skipped_peers"):
        _check(isinstance(c[key], dict), f"{where}.{key}", "an object")
    for key in ("speedup_vs", "time_ratio_to"):
        for peer, v in c[key].items():
            _check_number_or_none(v, f"{where}.{key}.{peer}")
    for peer, t in c["timings"].items():
        _check(isinstance(t, dict), f"{where}.timings.{peer}", "an object")
        _check_number_or_none(t.get("median_s"), f"{where}.timings.{peer}.median_s")
    for peer, why in c["skipped_peers"].items():
        _check(isinstance(why, str), f"{where}.skipped_peers.{peer}", "a string")
    best = c["best_of_repeats"]
    _check(best is None or isinstance(best, dict), f"{where}.best_of_repeats", "an object")
    if best:
        _check_number_or_none(best.get("spread"), f"{where}.best_of_repeats.spread")
    _check(isinstance(c["goals"], list), f"{where}.goals", "a list")
    for j, g in enumerate(c["goals"]):
        _check_goal(g, f"{where}.goals[{j}]")


def validate_results(doc):
    """Raise ValueError naming the first problem if ``doc`` is not a results document: a field
    that is missing or of the wrong type (what the tables, the Markdown and the chart read)."""
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    for key in ("schema", "date", "machine", "cases", "goals"):
        if key not in doc:
            raise ValueError(f"no {key!r} field")
    if doc["schema"] != SCHEMA:
        raise ValueError(f"schema {doc['schema']!r}, expected {SCHEMA!r}")
    _check(isinstance(doc["date"], str), "'date'", "a string")
    machine = doc["machine"]
    _check(isinstance(machine, dict), "'machine'", "an object")
    gpus = machine.get("gpus") or []
    _check(isinstance(gpus, list), "'machine.gpus'", "a list")
    for i, g in enumerate(gpus):
        _check(
            isinstance(g, dict) and all(k in g for k in ("index", "name", "memory_gib")),
            f"'machine.gpus[{i}]'",
            "an object with index, name and memory_gib",
        )
    ci = doc.get("commit_info")
    _check(ci is None or isinstance(ci, dict), "'commit_info'", "an object or null")
    if ci and ci.get("id") is not None:
        _check(isinstance(ci["id"], str), "'commit_info.id'", "a string")
    _check(isinstance(doc["cases"], list), "'cases'", "a list")
    for i, c in enumerate(doc["cases"]):
        _check_case(c, f"cases[{i}]")
    _check(isinstance(doc["goals"], list), "'goals'", "a list")
    for i, g in enumerate(doc["goals"]):
        _check_goal(g, f"goals[{i}]")
        for key in ("case", "backend", "dtype"):
            _check(isinstance(g.get(key, ""), str), f"goals[{i}].{key}", "a string")
        if "case" not in g:
            raise ValueError(f"goals[{i}] lacks case")
    errors = doc.get("errors") or []
    _check(isinstance(errors, list), "'errors'", "a list")
    for i, e in enumerate(errors):
        _check(isinstance(e, dict), f"errors[{i}]", "an object")
        missing = [k for k in ("backend", "dtype", "elements", "case", "reason") if k not in e]
        if missing:
            raise ValueError(f"errors[{i}] lacks {', '.join(missing)}")
        _check(
            isinstance(e["elements"], int) and not isinstance(e["elements"], bool),
            f"errors[{i}].elements",
            "a whole number",
        )


def load_results(path):
    """A results document from a file: ``fastopt bench`` JSON or pytest-benchmark JSON of
    ``bench/``. ValueError (readable, naming the file) for anything else."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text (JSON) file") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    if isinstance(data, dict) and "benchmarks" in data:
        benchmarks = data["benchmarks"] if isinstance(data["benchmarks"], list) else []
        if not any(
            isinstance(b, dict)
            and isinstance(b.get("extra_info"), dict)
            and "case" in b["extra_info"]
            for b in benchmarks
        ):
            raise ValueError(f"{path}: a pytest-benchmark JSON without fastopt bench/ cases")
        try:
            doc = from_pytest_benchmark(data, path)
            validate_results(doc)
        except ValueError as exc:
            raise ValueError(f"{path}: a pytest-benchmark JSON of bench/, but {exc}") from None
        return doc
    if isinstance(data, dict) and data.get("schema") == SCHEMA:
        try:
            validate_results(data)
        except ValueError as exc:
            raise ValueError(f"{path}: a fastopt bench JSON, but {exc}") from None
    else:
        try:
            validate_results(data)
        except ValueError as exc:
            raise ValueError(
                f"{path}: neither a fastopt bench JSON nor a pytest-benchmark JSON ({exc})"
            ) from None
    if not data["cases"]:
        raise ValueError(f"{path}: no case results to report")
    return data


# --------------------------------------------------------------------------------- formatting
PEER_COLUMNS = (
    ("numpy", "vs NumPy"),
    ("torch", "vs torch"),
    ("torch_foreach", "vs torch foreach"),
    ("torch_fused", "vs torch fused"),
    ("single_param", "vs 1 param"),
    ("fastopt_list", "vs fastopt list"),
)


def fmt_time(s):
    if s is None:
        return "—"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def fmt_si(x):
    if x is None:
        return "—"
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {prefix}"
    return f"{x:.3g}"


def fmt_num(x, suffix=""):
    return "—" if x is None else f"{x:.3g}{suffix}"


def _present_peers(cases):
    return [
        (k, t)
        for k, t in PEER_COLUMNS
        if any(k in c["speedup_vs"] or k in c.get("skipped_peers", {}) for c in cases)
    ]


def table_rows(doc, unicode=True):
    """(header, rows) of the results table: one row per case result."""
    cases = doc["cases"]
    present = _present_peers(cases)
    head = [
        "backend",
        "dtype",
        "case",
        "elements",
        "B/elt",
        "time/step",
        "elements/s",
        "GB/s",
        "roofline GB/s",
        "of roofline",
        "spread",
    ] + [t for _, t in present]
    rows = []
    for c in cases:
        cells = [
            c.get("backend", CPU_BACKEND),
            c["dtype"],
            c["case"] + (f" ({c['params']} params)" if c.get("params", 1) > 1 else ""),
            f"{c['elements']:,}",
            str(c["bytes_per_element"]),
            fmt_time(c["median_s"]),
            fmt_si(c["elements_per_s"]),
            fmt_num(c["gb_per_s"]),
            fmt_num(c.get("roofline_gb_per_s")),
            fmt_num(c.get("fraction_of_roofline")),
            fmt_num((c.get("best_of_repeats") or {}).get("spread")),
        ]
        for k, _ in present:
            if k in c["speedup_vs"]:
                cells.append(fmt_num(c["speedup_vs"][k], "x"))
            elif k in c.get("skipped_peers", {}):
                cells.append("n/a")
            else:
                cells.append("—" if unicode else "-")
        if not unicode:
            cells = [x.replace("—", "-").replace("µs", "us") for x in cells]
        rows.append(cells)
    return head, rows


def format_table(doc, unicode=True):
    """The results as an aligned plain-text table, with a legend and the unavailable peers."""
    head, rows = table_rows(doc, unicode)
    numeric = [i >= 3 for i in range(len(head))]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)
    ]

    def line(cells):
        return "  ".join(
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(cells, widths, numeric, strict=True)
        ).rstrip()

    out = [line(head), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    if not rows:
        out.append("(no results)")
    out += [
        "",
        "time/step: median seconds per opt.step() over interleaved rounds (fastopt and every peer "
        "timed round by round). GB/s = bytes/element x elements / time. of roofline = roofline "
        "time / fastopt time (1 = at the memory ceiling). vs X = X's time / fastopt's time (>1: "
        "fastopt is faster). n/a: peer unavailable. spread = slowest/fastest round (>1.1: noisy).",
    ]
    skipped = sorted(
        {(p, why) for c in doc["cases"] for p, why in c.get("skipped_peers", {}).items()}
    )
    if skipped:
        out += ["", "Unavailable peers:"]
        out += [f"  {p}: {why}" for p, why in skipped]
    for e in doc.get("errors") or []:
        out.append(
            f"not run: {e['case']} {e['dtype']} {e['elements']:,} on {e['backend']}: {e['reason']}"
        )
    text = "\n".join(out) + "\n"
    if not unicode:
        text = text.replace("—", "-").replace("µ", "u")
    return text


def _count(n, noun):
    """``1 thread``, ``2 threads``."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def markdown(doc):
    """The results document as Markdown: machine, results table, goals, unavailable peers."""
    m = doc["machine"]
    title = (
        "GPU and CPU"
        if any(c.get("backend", CPU_BACKEND) != CPU_BACKEND for c in doc["cases"])
        else "CPU"
    )
    lines = [f"# fastopt {title} benchmark, {doc['date']}", ""]
    if doc.get("machine_collected_at_report_time"):
        lines += [
            "> Machine details were not in the benchmark JSON; collected when the report was "
            "made (may differ from the machine that ran it).",
            "",
        ]
    lines += [
        f"- CPU: {m.get('cpu_model')}; {_count(m.get('logical_cores'), 'logical core')} "
        f"({m.get('usable_cores')} usable)",
        f"- Numba {m.get('numba')}, threading layer `{m.get('numba_threading_layer')}`, "
        f"{_count(m.get('numba_threads'), 'thread')}",
        f"- NumPy {m.get('numpy')}; torch {m.get('torch') or 'not installed'}"
        + (
            f" ({_count(m.get('torch_threads'), 'thread')} by default; run with Numba's thread count)"
            if m.get("torch")
            else ""
        ),
        f"- Python {m.get('python')}; {m.get('platform')}; fastopt {m.get('fastopt')}",
    ]
    for g in m.get("gpus") or []:
        lines.append(f"- GPU {g['index']}: {g['name']} ({g['memory_gib']} GiB)")
    ci = doc.get("commit_info") or {}
    if ci.get("id"):
        lines.append(f"- Commit {ci['id'][:12]}{' (dirty tree)' if ci.get('dirty') else ''}")
    lines.append(f"- Benchmark run: {doc.get('datetime')} ({doc.get('source')})")
    lines += ["", "## Results", ""]
    head, rows = table_rows(doc)
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += [
        "",
        "Median seconds per `opt.step()` from one interleaved run per case (fastopt and every "
        "peer timed round by round, order rotated). *of roofline* = time of a kernel with the same "
        "loads and stores per element and trivial arithmetic, on the same arrays / fastopt's time "
        "(on a GPU: a device-to-device copy of the same bytes). *vs X* = X's time / fastopt's time "
        "(above 1: fastopt is faster). *n/a*: peer unavailable (see below); —: not a peer of that "
        "case. *spread* = slowest / fastest round of fastopt (well above 1.1: a noisy machine).",
        "",
        "## Goals",
        "",
        "| case | backend | dtype | goal | value | status |",
        "|---|---|---|---|---:|---|",
    ]
    for g in doc["goals"]:
        value = "—" if g["value"] is None else f"{g['value']:.3g}"
        status = {"pass": "pass", "fail": "**FAIL**", "skipped": "skipped"}[g["status"]]
        lines.append(
            f"| {g['case']} | {g.get('backend', CPU_BACKEND)} | {g.get('dtype', '')} "
            f"| {g['goal']} | {value} | {status} |"
        )
    skipped = sorted(
        {(p, why) for c in doc["cases"] for p, why in c.get("skipped_peers", {}).items()}
    )
    if skipped:
        lines += ["", "## Unavailable peers", ""]
        lines += [f"- `{p}`: {why}" for p, why in skipped]
    if doc.get("errors"):
        lines += ["", "## Not run", ""]
        lines += [
            f"- {e['case']} {e['dtype']} {e['elements']:,} on {e['backend']}: {e['reason']}"
            for e in doc["errors"]
        ]
    return "\n".join(lines) + "\n"


def output_paths(prefix, *, chart=True, md=True):
    """{kind: path} of the files :func:`write_outputs` writes for ``prefix`` (``png`` only with
    ``chart`` and matplotlib installed). :class:`fastopt.fileio.OutputError` for a prefix that
    names no file (empty, ``.``, ``..``)."""
    if not os.fspath(prefix):
        raise OutputError("the output prefix is empty", prefix)
    prefix = pathlib.Path(prefix)
    if prefix.name in ("", ".", ".."):
        raise OutputError(f"{str(prefix)!r} names a directory, not a file prefix", str(prefix))
    kinds = ["json"] + (["md"] if md else [])
    if chart and package_version("matplotlib") is not None:
        kinds.append("png")
    return {k: prefix.with_name(prefix.name + "." + k) for k in kinds}


def check_outputs(prefix, *, chart=True, md=True):
    """Raise :class:`fastopt.fileio.OutputError` now if any file of :func:`write_outputs` could
    not be written: its directory cannot be created (a component is a file, or the nearest
    existing folder is not writable) or the file itself is refused by
    :func:`fastopt.fileio.check_output` (a directory, a special file ...). Nothing is created."""
    paths = output_paths(prefix, chart=chart, md=md)
    parent = os.path.abspath(os.path.dirname(os.fspath(paths["json"])) or ".")
    existing, missing = parent, False
    while True:
        try:
            st = os.stat(existing)
        except (FileNotFoundError, NotADirectoryError):
            existing, missing = os.path.dirname(existing), True
            continue
        except OSError as exc:
            raise OutputError(
                f"cannot write {prefix}.*: {existing}: {exc.strerror or exc}", str(prefix)
            ) from None
        break
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(
            f"cannot write {prefix}.*: {existing} is not a directory", str(prefix), errno.ENOTDIR
        )
    if missing:  # the files cannot exist yet; the folder must be creatable
        effective = os.access in os.supports_effective_ids
        if not os.access(existing, os.W_OK | os.X_OK, effective_ids=effective):
            raise OutputError(
                f"cannot create {parent}: the directory {existing} is not writable",
                str(prefix),
                errno.EACCES,
            )
        return paths
    for path in paths.values():
        check_output(path)
    return paths


def write_outputs(doc, prefix, *, chart=True, md=True):
    """Write ``prefix.json`` (and ``prefix.md``, ``prefix.png``); return {kind: path}. The chart
    is skipped, with the reason under ``"chart_skipped"``, when matplotlib is missing. Every
    path is checked (:func:`check_outputs`) before the first is written."""
    paths = check_outputs(prefix, chart=chart, md=md)
    parent = paths["json"].parent
    if not parent.exists():
        parent.mkdir(parents=True, exist_ok=True)
    out = {}
    write_text(paths["json"], json.dumps(doc, indent=1) + "\n")
    out["json"] = str(paths["json"])
    if md:
        write_text(paths["md"], markdown(doc))
        out["md"] = str(paths["md"])
    if chart:
        if "png" not in paths:
            out["chart_skipped"] = "matplotlib is not installed (pip install 'fastopt[plot]')"
        else:
            plot_chart(doc, paths["png"])
            out["png"] = str(paths["png"])
    return out
