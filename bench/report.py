"""Turn a pytest-benchmark JSON of ``bench/`` into a results JSON, a Markdown table and a chart.

Usage::

    pytest bench/ --benchmark-json=out.json
    python bench/report.py out.json                          # -> bench/results/cpu-<date>.{json,md,png}
    python bench/report.py out.json --out bench/results/NAME # -> bench/results/NAME.{json,md,png}

The same as ``fastopt bench --from-json out.json --out PREFIX``: both call
:mod:`fastopt.benchmarking` (``load_results``, ``markdown``, ``plot_chart``), so the report of
this suite and of the command line are one format. The chart needs matplotlib and is skipped
without it.
"""

import argparse
import pathlib
import sys

from fastopt import benchmarking

HERE = pathlib.Path(__file__).resolve().parent


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", help="pytest-benchmark JSON (pytest bench/ --benchmark-json=FILE)")
    ap.add_argument(
        "--out", help="output path without extension (default bench/results/cpu-<date>)"
    )
    ap.add_argument("--no-chart", action="store_true", help="do not write the PNG chart")
    args = ap.parse_args(argv)
    try:
        result = benchmarking.load_results(args.json)
    except ValueError as exc:
        ap.error(str(exc))
    out = pathlib.Path(args.out) if args.out else HERE / "results" / f"cpu-{result['date']}"
    written = benchmarking.write_outputs(result, out, chart=not args.no_chart)
    counts = {
        s: sum(g["status"] == s for g in result["goals"]) for s in ("pass", "fail", "skipped")
    }
    files = " and ".join(written[k] for k in ("json", "md", "png") if k in written)
    print(
        f"wrote {files}: {len(result['cases'])} cases; goals: "
        + ", ".join(f"{v} {k}" for k, v in counts.items())
    )
    if "chart_skipped" in written:
        print(f"no chart: {written['chart_skipped']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
