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
import json
import pathlib

from ..fileio import write_text
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
    cases = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info") or {}
        if "case" not in info or "median_s" not in info:
            continue
        row = dict(info)
        row.setdefault("backend", CPU_BACKEND)
        st = b.get("stats") or {}
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
    mi = (data.get("machine_info") or {}).get("fastopt_bench")
    collected_now = mi is None
    machine = machine_info() if collected_now else dict(mi)
    when = data.get("datetime")
    date = (dt.datetime.fromisoformat(when) if when else dt.datetime.now(dt.timezone.utc)).date()
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


def validate_results(doc):
    """Raise ValueError naming the first problem if ``doc`` is not a results document."""
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    for key in ("schema", "date", "machine", "cases", "goals"):
        if key not in doc:
            raise ValueError(f"no {key!r} field")
    if doc["schema"] != SCHEMA:
        raise ValueError(f"schema {doc['schema']!r}, expected {SCHEMA!r}")
    if not isinstance(doc["cases"], list):
        raise ValueError("'cases' is not a list")
    for i, c in enumerate(doc["cases"]):
        missing = [k for k in CASE_FIELDS if k not in c]
        if missing:
            raise ValueError(f"cases[{i}] lacks {', '.join(missing)}")


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
            isinstance(b, dict) and "case" in (b.get("extra_info") or {}) for b in benchmarks
        ):
            raise ValueError(f"{path}: a pytest-benchmark JSON without fastopt bench/ cases")
        return from_pytest_benchmark(data, path)
    try:
        validate_results(data)
    except ValueError as exc:
        raise ValueError(
            f"{path}: neither a fastopt bench JSON nor a pytest-benchmark JSON ({exc})"
        ) from None
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


def write_outputs(doc, prefix, *, chart=True, md=True):
    """Write ``prefix.json`` (and ``prefix.md``, ``prefix.png``); return {kind: path}. The chart
    is skipped, with the reason under ``"chart_skipped"``, when matplotlib is missing."""
    prefix = pathlib.Path(prefix)
    if prefix.parent and not prefix.parent.exists():
        prefix.parent.mkdir(parents=True, exist_ok=True)
    out = {}
    json_path = prefix.with_name(prefix.name + ".json")
    write_text(json_path, json.dumps(doc, indent=1) + "\n")
    out["json"] = str(json_path)
    if md:
        md_path = prefix.with_name(prefix.name + ".md")
        write_text(md_path, markdown(doc))
        out["md"] = str(md_path)
    if chart:
        if package_version("matplotlib") is None:
            out["chart_skipped"] = "matplotlib is not installed (pip install 'fastopt[plot]')"
        else:
            png = prefix.with_name(prefix.name + ".png")
            plot_chart(doc, png)
            out["png"] = str(png)
    return out
