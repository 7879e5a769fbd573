"""Turn a pytest-benchmark JSON of ``bench/`` into a results JSON and a Markdown table.

Usage::

    pytest bench/ --benchmark-json=out.json
    python bench/report.py out.json                          # -> bench/results/cpu-<date>.{json,md}
    python bench/report.py out.json --out bench/results/NAME # -> bench/results/NAME.{json,md}

The numbers come from each benchmark's ``extra_info`` (``cases.run_case``: fastopt and its peers
timed in one interleaved run); pytest-benchmark's own statistics of the fastopt step are kept in the
JSON for reference. Machine details come from the benchmark JSON (recorded where it ran, by
``bench/conftest.py``); if absent they are collected here and marked as such.
"""

import argparse
import datetime as dt
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
PEER_COLUMNS = (
    ("numpy", "vs NumPy"),
    ("torch_foreach", "vs torch foreach"),
    ("torch_fused", "vs torch fused"),
    ("single_param", "vs 1 param"),
    ("fastopt_list", "vs fastopt list"),
)


def _fmt_time(s):
    if s is None:
        return "—"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def _fmt_si(x):
    if x is None:
        return "—"
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {prefix}"
    return f"{x:.3g}"


def _fmt_num(x, suffix=""):
    return "—" if x is None else f"{x:.3g}{suffix}"


def load_cases(data):
    """run_case results (plus pytest-benchmark stats) of every bench case in a benchmark JSON."""
    out = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info") or {}
        if "case" not in info or "median_s" not in info:
            continue
        row = dict(info)
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
        out.append(row)
    return out


def machine(data):
    mi = data.get("machine_info") or {}
    info = mi.get("fastopt_bench")
    if info is not None:
        return dict(info), False
    sys.path.insert(0, str(HERE))
    import cases

    return cases.machine_info(), True


def markdown(result):
    m = result["machine"]
    lines = [f"# fastopt CPU benchmark, {result['date']}", ""]
    if result["machine_collected_at_report_time"]:
        lines += [
            "> Machine details were not in the benchmark JSON; collected when the report was "
            "made (may differ from the machine that ran it).",
            "",
        ]
    lines += [
        f"- CPU: {m.get('cpu_model')}; {m.get('logical_cores')} logical cores "
        f"({m.get('usable_cores')} usable)",
        f"- Numba {m.get('numba')}, threading layer `{m.get('numba_threading_layer')}`, "
        f"{m.get('numba_threads')} threads",
        f"- NumPy {m.get('numpy')}; torch {m.get('torch') or 'not installed'}"
        + (
            f" ({m.get('torch_threads')} threads by default; run with Numba's thread count)"
            if m.get("torch")
            else ""
        ),
        f"- Python {m.get('python')}; {m.get('platform')}; fastopt {m.get('fastopt')}",
    ]
    ci = result.get("commit_info") or {}
    if ci.get("id"):
        lines.append(f"- Commit {ci['id'][:12]}{' (dirty tree)' if ci.get('dirty') else ''}")
    lines.append(f"- Benchmark run: {result.get('datetime')}")
    lines += ["", "## Results", ""]
    cases = result["cases"]
    present = [(k, t) for k, t in PEER_COLUMNS if any(k in c["speedup_vs"] for c in cases)]
    head = [
        "case",
        "dtype",
        "elements",
        "params",
        "B/elt",
        "median/step",
        "elements/s",
        "GB/s",
        "of roofline",
        "spread",
    ] + [t for _, t in present]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for c in cases:
        cells = [
            c["case"],
            c["dtype"],
            f"{c['elements']:,}",
            str(c["params"]),
            str(c["bytes_per_element"]),
            _fmt_time(c["median_s"]),
            _fmt_si(c["elements_per_s"]),
            _fmt_num(c["gb_per_s"]),
            _fmt_num(c.get("fraction_of_roofline")),
            _fmt_num((c.get("best_of_repeats") or {}).get("spread")),
        ]
        for k, _ in present:
            if k in c["speedup_vs"]:
                cells.append(_fmt_num(c["speedup_vs"][k], "x"))
            elif k in c.get("skipped_peers", {}):
                cells.append("n/a")
            else:
                cells.append("—")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Median seconds per `opt.step()` from one interleaved run per case (fastopt and every "
        "peer timed round by round, order rotated). *of roofline* = time of a kernel with the same "
        "loads and stores per element and trivial arithmetic, on the same arrays / fastopt's time. "
        "*vs X* = X's time / fastopt's time (above 1: fastopt is faster). *n/a*: peer unavailable "
        "(see below); —: not a peer of that case. *spread* = slowest / fastest round of fastopt "
        "(well above 1.1: a noisy machine).",
        "",
        "## Goals",
        "",
        "| case | goal | value | status |",
        "|---|---|---:|---|",
    ]
    for g in result["goals"]:
        value = "—" if g["value"] is None else f"{g['value']:.3g}"
        status = {"pass": "pass", "fail": "**FAIL**", "skipped": "skipped"}[g["status"]]
        lines.append(f"| {g['case']} | {g['goal']} | {value} | {status} |")
    skipped = sorted({(p, why) for c in cases for p, why in c.get("skipped_peers", {}).items()})
    if skipped:
        lines += ["", "## Unavailable peers", ""]
        lines += [f"- `{p}`: {why}" for p, why in skipped]
    return "\n".join(lines) + "\n"


def build(data, source):
    m, collected_now = machine(data)
    cases = load_cases(data)
    when = data.get("datetime")
    date = (dt.datetime.fromisoformat(when) if when else dt.datetime.now(dt.timezone.utc)).date()
    goals = [{"case": c["case"], **g} for c in cases for g in c.get("goals", [])]
    return {
        "date": date.isoformat(),
        "datetime": when,
        "source": str(source),
        "machine": m,
        "machine_collected_at_report_time": collected_now,
        "commit_info": data.get("commit_info"),
        "pytest_benchmark_version": data.get("version"),
        "cases": cases,
        "goals": goals,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", help="pytest-benchmark JSON (pytest bench/ --benchmark-json=FILE)")
    ap.add_argument(
        "--out", help="output path without extension (default bench/results/cpu-<date>)"
    )
    args = ap.parse_args(argv)
    src = pathlib.Path(args.json)
    data = json.loads(src.read_text())
    result = build(data, src)
    if not result["cases"]:
        ap.error(f"{src} holds no bench/ cases (no benchmark with fastopt extra_info)")
    out = pathlib.Path(args.out) if args.out else HERE / "results" / f"cpu-{result['date']}"
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out.with_name(out.name + ".json"), out.with_name(out.name + ".md")
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(markdown(result))
    counts = {
        s: sum(g["status"] == s for g in result["goals"]) for s in ("pass", "fail", "skipped")
    }
    print(
        f"wrote {json_path} and {md_path}: {len(result['cases'])} cases; goals: "
        + ", ".join(f"{v} {k}" for k, v in counts.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
