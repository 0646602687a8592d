"""Regenerate the tables of the README's "Measured" section from the benchmarks' results.

Each table sits between ``<!-- bench:NAME ... -->`` and ``<!-- /bench:NAME -->`` in README.md and is made from
``benchmarks/results/NAME.json`` (``preprocess``, ``train``, ``quality``, ``lambda``, ``end_to_end``,
``load``); the prose around the tables is left as it is. A figure that misses its goal is marked **missed**; a
run made with ``--quick`` says so. A table whose results file is missing is left as it was.

Usage::

    python benchmarks/readme_tables.py              # rewrite README.md from benchmarks/results
    python benchmarks/readme_tables.py --check      # exit 1 if README.md's tables differ from the results
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_README = ROOT / "README.md"
TIMES = "\u00d7"  # the multiplication sign the README writes ratios with
BLOCK = re.compile(
    r"(<!-- bench:(?P<name>\w+)[^>]*-->\n)(?P<table>.*?)(<!-- /bench:(?P=name) -->)", re.DOTALL
)


def _verdict(goal: str, met: bool, which: str = "") -> str:
    return f"{goal} — met" if met else f"{goal} — **missed**" + (f" ({which})" if which else "")


def _number(goal: str) -> str:
    """`">= 1.5"` → `"1.5"`."""
    return f"{float(goal.split()[-1]):g}"


def _source(name: str, target: str, report: dict[str, Any], runs: str) -> str:
    quick = "**quick run**, " if report["config"].get("quick") else ""
    return f"{quick}{runs} (`benchmarks/results/{name}.md`; `make {target}`)"


def preprocess_table(report: dict[str, Any]) -> list[str]:
    results = report["results"]
    config = report["config"]
    sizes = [re.sub(r"(\d)([KMG]B)$", r"\1 \2", r["label"]) for r in results]
    source = _source("preprocess", "bench-preprocess", report, f"{config['repeats']} repeat(s)")
    lines = [
        f"| preprocessing, {source} | " + " | ".join(f"{s} CSV" for s in sizes) + " | goal |",
        "|---|" + "---:|" * len(sizes) + "---|",
    ]

    def row(label: str, figure: str, cell: Callable[[float], str], goal: str, met: bool | None = None) -> str:
        figures = [r["figures"][figure] for r in results]
        ok = all(f["met"] for f in figures) if met is None else met
        return f"| {label} | " + " | ".join(cell(f["value"]) for f in figures) + f" | {_verdict(goal, ok)} |"

    first = results[0]["figures"]
    lines.append(
        row(
            "throughput ÷ pandas `read_csv` + `to_csv`",
            "conveyor_vs_pandas",
            lambda v: f"{v:.2f}{TIMES}",
            f"≥ {_number(first['conveyor_vs_pandas']['goal'])}{TIMES}",
        )
    )
    lines.append(
        row(
            "throughput ÷ a raw read of the file (page cache)",
            "conveyor_vs_raw_read",
            lambda v: f"{v:.3f}",
            f"≥ {_number(first['conveyor_vs_raw_read']['goal'])}",
        )
    )
    flat = report["summary"].get("rss_flatness")
    rss_met = all(r["figures"]["conveyor_peak_rss_mib"]["met"] for r in results) and (not flat or flat["met"])
    lines.append(
        row(
            "peak RSS",
            "conveyor_peak_rss_mib",
            lambda v: f"{v:.0f} MiB",
            f"≤ {_number(first['conveyor_peak_rss_mib']['goal'])} MiB" + (", flat" if flat else ""),
            rss_met,
        )
    )
    return lines


def train_table(report: dict[str, Any]) -> list[str]:
    config, results = report["config"], report["results"]
    runs = f"{config['loop_repeats']} loop and {config['server_repeats']} server repeat(s)"
    lines = [
        f"| training and serving, {_source('train', 'bench-train', report, runs)} | measured | goal |",
        "|---|---:|---|",
    ]
    loop = results["training_loop"]["figures"]["conveyor_vs_bare"]
    verdict = _verdict(f"≥ {_number(loop['goal'])}", loop["met"])
    lines.append(
        "| `train.fit` samples/s ÷ a bare torch loop (same model, data, batch size, steps) "
        f"| {loop['value']:.2f} | {verdict} |"
    )
    for i, payload in enumerate(results["model_server"]["payloads"]):
        figure = payload["figures"]["conveyor_vs_flask"]
        rows = f"{payload['rows']} row{'s' if payload['rows'] != 1 else ''} per request"
        label = (
            f"local model server requests/s ÷ a naive Flask server, {rows}" if i == 0 else f"the same, {rows}"
        )
        verdict = _verdict(f"≥ {_number(figure['goal'])}{TIMES}", figure["met"])
        lines.append(f"| {label} | {figure['value']:.2f}{TIMES} | {verdict} |")
    for i, case in enumerate(results["proxy"]["cases"]):
        figure, stubbed = case["figures"]["proxy_p50_ms"], case["stubber"]
        rows = f"{case['rows']} row{'s' if case['rows'] != 1 else ''} per request"
        label = (
            f"inference proxy handler's added latency, p50 (p99), {rows}" if i == 0 else f"the same, {rows}"
        )
        verdict = _verdict(f"p50 ≤ {_number(figure['goal'])} ms", figure["met"])
        lines.append(f"| {label} | {stubbed['p50_ms']:.2f} ms ({stubbed['p99_ms']:.1f} ms) | {verdict} |")
    return lines


METRIC_LABELS = {"accuracy": "accuracy", "macro_f1": "macro F1", "r2": "R²", "rmse": "RMSE"}


def quality_table(report: dict[str, Any]) -> list[str]:
    config = report["config"]
    primary = config["primary_variant"]
    runs = f"mean of {config['repeats']} split(s)"
    lines = [
        f"| model quality on held-out data, {_source('quality', 'bench-quality', report, runs)} "
        "| conveyor | scikit-learn linear baseline | goal: conveyor ≥ baseline, within |",
        "|---|---:|---:|---|",
    ]
    for result in report["results"]:
        metrics = result["metrics"]
        names = " / ".join(METRIC_LABELS.get(m, m) for m in metrics)

        def value(metric: str, entry: dict[str, Any]) -> str:
            return f"{entry['mean']:.1f}" if metric == "rmse" else f"{entry['mean']:.3f}"

        ours = " / ".join(value(m, e["conveyor"][primary]) for m, e in metrics.items())
        theirs = " / ".join(value(m, e["baseline"]) for m, e in metrics.items())
        missed = [METRIC_LABELS.get(m, m) for m, e in metrics.items() if not e["conveyor"][primary]["met"]]
        tolerance = (
            "one test row"
            if result["task"] == "classification"
            else " / ".join(
                f"{config['tolerance'][m]:g}" if isinstance(config["tolerance"][m], float) else "1%"
                for m in metrics
            )
        )
        which = ", ".join(missed) if 0 < len(missed) < len(metrics) else ""
        lines.append(
            f"| {result['dataset']}: {names} | {ours} | {theirs} | {_verdict(tolerance, not missed, which)} |"
        )
    return lines


def lambda_table(report: dict[str, Any]) -> list[str]:
    config, results = report["config"], report["results"]
    imports, packages = results["imports"], results["packages"]
    limit = _number(config["goals"]["unzipped_mib"].split(" (")[0])
    goal = _number(config["goals"]["cold_import_vs_boto3"])
    source = _source("lambda", "bench-lambda", report, f"{config['repeats']} repeat(s)")
    lines = [
        f"| Lambda cold start, {source} "
        f"| import ÷ `import boto3`, venv | as packaged | package, unzipped (limit {limit} MiB) | goal |",
        "|---|---:|---:|---:|---|",
    ]
    sizes = {p["function"]: p for p in packages["functions"]}
    labels = {"venv": "venv", "packaged": "as packaged"}
    for function in config["functions"]:
        name = function["function"]
        cells, missed = [], []
        for mode in ("venv", "packaged"):
            entry = next(
                (e for e in imports.get(mode, {}).get("functions", []) if e["function"] == name), None
            )
            if entry is None:
                cells.append("not measured")
                continue
            figure = entry["figures"]["cold_import_vs_boto3"]
            cells.append(f"{figure['value']:.2f}{TIMES}")
            if not figure["met"]:
                missed.append(labels[mode])
        package = sizes.get(name)
        if package is None or not package.get("built"):
            size = "not built"
        else:
            size = f"{package['mib']:.1f} MiB"
            if not package["figures"]["unzipped_mib"]["met"]:
                size = f"**{size}, over the limit**"
        module = function["handler"].rpartition(".")[0]
        verdict = _verdict(f"≤ {goal}{TIMES}", not missed, ", ".join(missed))
        lines.append(f"| {name} (`{module}`) | {cells[0]} | {cells[1]} | {size} | {verdict} |")
    return lines


def end_to_end_table(report: dict[str, Any]) -> list[str]:
    config, results = report["config"], report["results"]
    median = results["median"]
    figure = results["figures"]["end_to_end_vs_training"]
    job = results["figures"]["end_to_end_vs_training_job"]
    runs = f"{config['repeats']} repeat(s)"
    verdict = _verdict(f"≤ {_number(figure['goal'])}{TIMES}", figure["met"])
    return [
        f"| local end to end, {_source('end_to_end', 'bench-e2e', report, runs)} | measured | goal |",
        "|---|---:|---|",
        "| upload → first successful prediction ÷ training alone (the job's `train.py` run directly on the "
        f"same data and hyperparameters) | {figure['value']:.2f}{TIMES} ({median['end_to_end_seconds']:.1f} s ÷ "
        f"{median['direct_training_seconds']:.1f} s) | {verdict} |",
        "| the same ÷ the training job's own duration (DescribeTrainingJob; adds the download of its data "
        f"and the upload of the model) | {job['value']:.2f}{TIMES} ({median['end_to_end_seconds']:.1f} s ÷ "
        f"{median['training_job_seconds']:.1f} s) | — |",
    ]


def load_table(report: dict[str, Any]) -> list[str]:
    config, results = report["config"], report["results"]
    figures, update, median = results["figures"], results["update"], results["median_steady"]
    runs = f"{config['clients']} clients, {config['rounds']} steady round(s)"
    failed, spans = figures["failed_requests"], update["versions_over_time"]
    old, new = spans.get(results["first_version"]), spans.get(results["second_version"] or "")
    if old and new:
        share = update.get("canary_window", {}).get("new_version_share")
        versions = f"old until {old['last_s']:.1f} s, new from {new['first_s']:.1f} s" + (
            f" ({share:.0%} new while both answered)" if share is not None else ""
        )
    else:
        versions = ", ".join(sorted(spans)) or "none"
    memory = [w for w in results["memory"] if w["measured"]]
    stack = [w for w in memory if not w["process"].startswith("model server")]
    servers = [w for w in memory if w["process"].startswith("model server")]
    growth = "; ".join(
        ", ".join(f"{w['growth_percent']:+.1f}%" for w in group) for group in (stack, servers) if group
    )
    rule = _number(figures["memory_growth"]["goal"].split(" x ")[0])
    ratio = figures["api_vs_direct_requests_per_s"]["value"]
    return [
        f"| local HTTPS API under load, {_source('load', 'bench-load', report, runs)} | measured | goal |",
        "|---|---:|---|",
        "| failed requests through the API (a status other than 200, or a connection error), steady and "
        f"during a model update | {failed['value']:,} of {failed['of']:,} | {_verdict('0', failed['met'])} |",
        f"| which model answered during the update (blue/green, canary) | {versions} "
        f"| {_verdict('both, old first, new last', figures['both_versions_answered']['met'])} |",
        "| requests/s through the API during the update; p50 / p99 latency "
        f"| {update['requests_per_s']:,.1f}; {update['p50_ms']:.0f} / {update['p99_ms']:.0f} ms | — |",
        "| the API ÷ the model server directly, requests/s, steady load "
        f"| {ratio:.3f}{TIMES} ({median['api']['requests_per_s']:,.0f} ÷ "
        f"{median['direct']['requests_per_s']:,.0f}) | — |",
        "| RSS growth: the stack's process (steady rounds; with the update); the model servers (old, new) "
        f"| {growth} | {_verdict(f'each ≤ {rule}{TIMES} its start', figures['memory_growth']['met'])} |",
    ]


RENDERERS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "preprocess": preprocess_table,
    "train": train_table,
    "quality": quality_table,
    "lambda": lambda_table,
    "end_to_end": end_to_end_table,
    "load": load_table,
}


def render(readme: str, results_dir: Path) -> tuple[str, list[str]]:
    """The README with every marked table remade from `results_dir`; and what was left as it was, and why."""
    notes: list[str] = []

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        path = results_dir / f"{name}.json"
        if name not in RENDERERS:
            notes.append(f"{name}: no renderer for this table; left as it was")
            return match[0]
        if not path.exists():
            notes.append(f"{name}: no {path}; left as it was")
            return match[0]
        table = "\n".join(RENDERERS[name](json.loads(path.read_text()))) + "\n"
        return match[1] + table + match[4]

    return BLOCK.sub(replace, readme), notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="where the results are")
    parser.add_argument("--readme", type=Path, default=DEFAULT_README, help="the README to rewrite")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is stale")
    args = parser.parse_args(argv)
    before = args.readme.read_text(encoding="utf-8")
    found = [m["name"] for m in BLOCK.finditer(before)]
    if not found:
        parser.error(f"{args.readme} has no <!-- bench:NAME --> ... <!-- /bench:NAME --> tables")
    after, notes = render(before, args.results)
    for note in notes:
        print(note, file=sys.stderr)
    if args.check:
        if after != before:
            print(
                f"{args.readme}'s tables differ from {args.results}: run python benchmarks/readme_tables.py",
                file=sys.stderr,
            )
            return 1
        return 0
    if after != before:
        args.readme.write_text(after, encoding="utf-8")
    print(f"{args.readme}: {', '.join(found)} table(s) made from {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
