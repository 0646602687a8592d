"""Preprocessing throughput and memory: conveyor against pandas and against a raw read of the same file.

Generates (once, cached) a realistic CSV of each requested size, then times three tasks on it, each in a
fresh subprocess so that peak memory belongs to that run alone:

``raw_read``  read the file in 1 MiB chunks and discard them (the ceiling: what the disk and page cache give);
``pandas``    ``pandas.read_csv`` of the file and ``to_csv`` of the frame to a temporary file;
``conveyor``  ``preprocess.core.preprocess`` (imported as Lambda imports it) writing its three splits to
              local files.

Figures (medians over the repeats), each with its goal from issue 4: conveyor throughput ÷ pandas (≥ 1.5),
conveyor ÷ raw read (≥ 0.3), conveyor peak RSS (≤ 256 MiB) and its flatness from the smallest to the
largest input. Results go to ``benchmarks/results/preprocess.{json,md}``; a figure that misses its goal is
marked as missing it.

Usage::

    python benchmarks/preprocess.py                        # 100MB and 1GB, 3 repeats
    python benchmarks/preprocess.py --sizes 50MB --repeats 1
    python benchmarks/preprocess.py --quick                # 2MB, 1 repeat: a smoke test
    python benchmarks/preprocess.py --profile 50MB         # cProfile of conveyor, top 15 by tottime
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _shared

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
FUNCTIONS = ROOT / "functions"
DEFAULT_CACHE = ROOT / ".bench-cache"
DEFAULT_OUTPUT = BENCHMARKS / "results"
TASKS = ("raw_read", "pandas", "conveyor")
CHUNK = 1 << 20
MIB = 1 << 20
MB = 10**6

GOAL_VS_PANDAS = 1.5
GOAL_VS_RAW = 0.3
GOAL_RSS_MIB = 256.0
# "Flat": the largest input's peak RSS at most this many times the smallest's (this benchmark's own bar).
GOAL_RSS_GROWTH = 1.25

# Bump when the generated data changes, so cached files of an older shape are not reused.
GENERATOR_VERSION = 1
SEED = 20261122
ROWS_PER_CHUNK = 20_000

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 1 << 10,
    "MIB": 1 << 20,
    "GIB": 1 << 30,
}


def parse_size(text: str) -> int:
    """`100MB` → 100_000_000, `1GiB` → 2**30 (decimal units unless written KiB/MiB/GiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (write e.g. 100MB, 1GB, 512KiB)")
    number, unit = match.groups()
    size = int(float(number) * _UNITS[(unit or "").upper()])
    if size < 10_000:
        raise argparse.ArgumentTypeError(f"{text!r} is too small: the file needs at least 10 KB of rows")
    return size


def size_label(size: int) -> str:
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# The dataset: a customer-churn table with the shapes real uploads have.

HEADER = [
    "customer_id",
    "age",
    "tenure_months",
    "monthly_charges",
    "total_charges",
    "satisfaction",
    "city",
    "plan",
    "channel",
    "last_comment",
    "churned",
]
CITIES = [
    "Amsterdam", "Athens", "Barcelona", "Berlin", "Bordeaux", "Bratislava", "Brussels", "Bucharest",
    "Budapest", "Copenhagen", "Dublin", "Edinburgh", "Florence", "Frankfurt", "Geneva", "Gothenburg",
    "Hamburg", "Helsinki", "Kraków", "Köln", "Lisbon", "Ljubljana", "London", "Lyon", "Madrid", "Málaga",
    "Marseille", "Milan", "Munich", "Naples", "Oslo", "Paris", "Porto", "Prague", "Riga", "Rome",
    "Rotterdam", "Sevilla", "Stockholm", "Tallinn", "Valencia", "Vienna", "Vilnius", "Warsaw", "Zürich",
]  # fmt: skip
PLANS = ["basic", "basic-plus", "standard", "family", "pro", "business", "student", "senior"]
CHANNELS = ["web", "app", "store", "phone", "partner"]
_COMMENT_WORDS = (
    "the app keeps crashing when I open my bill support was quick and friendly price went up again "
    "too expensive for what it is great coverage in the city no signal at home please call me back "
    "router replaced twice slow internet evenings love the new plan want to cancel moving abroad "
    "billing error refund pending contract ends soon competitor offered a better deal happy overall "
    "hidden fees roaming charges data runs out fast upgrade my phone thanks for the help"
)
WORDS = _COMMENT_WORDS.split()
MISSING_MARKERS = ["", "NA", "null", "N/A"]


def generate_rows(chunk_index: int, start_id: int, seed: int) -> list[list[Any]]:
    """One chunk of rows, determined by (seed, chunk_index) alone, so every file is a prefix of a bigger one."""
    import numpy as np  # a dependency of pandas (the `bench` extra)

    rng = np.random.default_rng([seed, chunk_index])
    n = ROWS_PER_CHUNK
    age = rng.integers(18, 91, n)
    tenure = rng.integers(0, 121, n)
    monthly = np.clip(rng.normal(65.0, 30.0, n), 5.0, 250.0)
    total = monthly * tenure * rng.uniform(0.9, 1.1, n)
    satisfaction = rng.uniform(0.0, 10.0, n)
    city = rng.choice(len(CITIES), n, p=_zipf(len(CITIES)))
    plan = rng.choice(len(PLANS), n, p=_zipf(len(PLANS)))
    channel = rng.integers(0, len(CHANNELS), n)
    words = rng.integers(0, len(WORDS), (n, 9))
    lengths = rng.integers(3, 10, n)
    comma_at = rng.integers(1, 3, n)
    decoration = rng.random(n)  # a comma (quoted field) or a quoted phrase in some comments
    risk = -1.2 + 0.35 * (monthly - 65.0) / 30.0 - 0.02 * tenure + 0.25 * (5.0 - satisfaction)
    churned = rng.random(n) < 1.0 / (1.0 + np.exp(-risk))
    # A few missing values of several spellings, in the columns where real exports have them.
    gaps = rng.random((n, 4))
    marker = rng.integers(0, len(MISSING_MARKERS), n)

    rows: list[list[Any]] = []
    for i in range(n):
        text = " ".join(WORDS[w] for w in words[i, : lengths[i]])
        if decoration[i] < 0.08:
            head, _, tail = text.partition(" ")
            text = f"{head}, {tail}" if comma_at[i] == 1 else f'"{head}" {tail}'
        elif decoration[i] > 0.9:
            text = ""
        missing = MISSING_MARKERS[marker[i]]
        rows.append(
            [
                start_id + i,
                int(age[i]),
                int(tenure[i]),
                f"{monthly[i]:.2f}",
                missing if gaps[i, 0] < 0.02 else f"{total[i]:.2f}",
                missing if gaps[i, 1] < 0.03 else f"{satisfaction[i]:.1f}",
                CITIES[city[i]],
                PLANS[plan[i]],
                missing if gaps[i, 2] < 0.01 else CHANNELS[channel[i]],
                text,
                "yes" if churned[i] else "no",
            ]
        )
    return rows


def _zipf(n: int) -> list[float]:
    weights = [1.0 / (rank + 1) ** 0.8 for rank in range(n)]
    total = sum(weights)
    return [w / total for w in weights]


def dataset(size: int, cache_dir: Path, seed: int = SEED) -> tuple[Path, dict[str, Any]]:
    """The cached CSV of `size` bytes (at least; it ends at a row boundary), generating it if needed.

    Generation runs in its own process, so this one stays small: on Linux a child's ru_maxrss starts
    from the RSS of the parent that spawned it.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"churn-{size_label(size)}-seed{seed}-v{GENERATOR_VERSION}.csv"
    info_path = path.with_suffix(".json")
    if path.exists() and info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("bytes") == path.stat().st_size:
            progress(f"{size_label(size)}: using cached {path} ({info['rows']:,} rows)")
            return path, info
    progress(f"{size_label(size)}: generating {path} ...")
    subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "_generate", str(size), str(path), str(seed)],
        check=True,
    )
    return path, json.loads(info_path.read_text())


def write_dataset(size: int, path: Path, seed: int) -> None:
    """Write the CSV streaming, chunk by chunk, then its row count beside it; a crash leaves only `.part`."""
    started = time.perf_counter()
    info_path = path.with_suffix(".json")
    partial = path.with_name(path.name + ".part")
    written = rows = 0
    next_report = 0.1
    with partial.open("wb") as out:
        header = (",".join(HEADER) + "\n").encode()
        out.write(header)
        written = len(header)
        chunk_index = 0
        while written < size:
            buffer = io.StringIO()
            csv.writer(buffer, lineterminator="\n").writerows(
                generate_rows(chunk_index, 1 + chunk_index * ROWS_PER_CHUNK, seed)
            )
            data = buffer.getvalue().encode("utf-8")
            if written + len(data) > size:
                # Free text never holds a newline, so every newline ends a row.
                data = data[: data.index(b"\n", size - written - 1) + 1]
            out.write(data)
            written += len(data)
            rows += data.count(b"\n")
            chunk_index += 1
            if written >= next_report * size:
                progress(f"{size_label(size)}: generated {min(written / size, 1):.0%} ({rows:,} rows)")
                while written >= next_report * size:
                    next_report += 0.1
    info = {"bytes": written, "rows": rows, "seed": seed, "generator_version": GENERATOR_VERSION}
    info["generation_seconds"] = round(time.perf_counter() - started, 1)
    info_path.write_text(json.dumps(info, indent=2))
    os.replace(partial, path)
    progress(
        f"{size_label(size)}: generated {written:,} bytes, {rows:,} rows in {info['generation_seconds']} s"
    )


# ---------------------------------------------------------------------------------------------------------
# One measured task, in a child process.


def _peak_rss_bytes() -> int:
    """This process's own high-water RSS (VmHWM: the address space since exec, not the parent's)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _import_conveyor() -> Any:
    # As in Lambda: functions/ is the import root. This script is named preprocess.py too, so its own
    # directory must not shadow the `preprocess` package.
    sys.path[:] = [str(FUNCTIONS), *(p for p in sys.path if p and Path(p).resolve() != BENCHMARKS)]
    from preprocess import core

    return core


def _task_raw_read(source: Path, workdir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    total = 0
    with source.open("rb", buffering=0) as f:
        while chunk := f.read(CHUNK):
            total += len(chunk)
    return {"seconds": time.perf_counter() - started, "bytes_read": total}


def _task_pandas(source: Path, workdir: Path) -> dict[str, Any]:
    import pandas

    started = time.perf_counter()
    frame = pandas.read_csv(source)
    target = workdir / "pandas.csv"
    frame.to_csv(target, index=False)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "rows": len(frame), "bytes_written": target.stat().st_size}


def _task_conveyor(source: Path, workdir: Path) -> dict[str, Any]:
    core = _import_conveyor()

    @contextlib.contextmanager
    def open_split(split: str) -> Iterator[Any]:
        with (workdir / f"{split}.csv").open("w", encoding="utf-8", newline="") as handle:
            yield handle

    provenance = {
        "dataset": "bench-churn",
        "version": "20261122T000000Z-bench0",
        "source": {
            "bucket": "local",
            "key": f"datasets/bench-churn/{source.name}",
            "version_id": None,
            "etag": None,
            "size": source.stat().st_size,
        },
    }
    started = time.perf_counter()
    with source.open("rb") as stream:
        manifest = core.preprocess(
            stream, spec=core.DatasetSpec(), open_split=open_split, provenance=provenance, fmt="csv"
        )
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "rows": manifest["counts"]["rows_read"],
        "rows_used": manifest["counts"]["rows_used"],
        "dropped": manifest["dropped"],
        "task": manifest["task"],
        "bytes_written": sum(p.stat().st_size for p in workdir.glob("*.csv")),
        "core_py_sha256": hashlib.sha256(Path(core.__file__).read_bytes()).hexdigest(),
    }


CHILD_TASKS = {"raw_read": _task_raw_read, "pandas": _task_pandas, "conveyor": _task_conveyor}


def child_main(argv: list[str]) -> None:
    task, source, workdir = argv[0], Path(argv[1]), Path(argv[2])
    result = CHILD_TASKS[task](source, workdir)
    result["peak_rss_bytes"] = _peak_rss_bytes()
    print(json.dumps(result))


class _RssSampler(threading.Thread):
    """Samples a process's RSS every half second, to show whether memory grows as the file goes by."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.status = Path(f"/proc/{pid}/status")
        self.samples: list[tuple[float, float]] = []
        self.done = threading.Event()

    def run(self) -> None:
        started = time.perf_counter()
        while not self.done.wait(0.5):
            try:
                text = self.status.read_text()
            except OSError:
                return
            for line in text.splitlines():
                if line.startswith("VmRSS:"):
                    self.samples.append(
                        (round(time.perf_counter() - started, 1), int(line.split()[1]) / 1024)
                    )

    def timeline(self, points: int = 11) -> list[list[float]]:
        """At most `points` samples, evenly spaced, the last one included: [[seconds, MiB], ...]."""
        if len(self.samples) <= points:
            chosen = self.samples
        else:
            step = (len(self.samples) - 1) / (points - 1)
            chosen = [self.samples[round(i * step)] for i in range(points)]
        return [[t, round(mib, 1)] for t, mib in chosen]


def measure(task: str, source: Path, work_root: Path) -> dict[str, Any]:
    """Run one task in a fresh interpreter; its timing comes from inside, its memory from the kernel."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{task}-", dir=work_root))
    try:
        started = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "_child", task, str(source), str(workdir)],
            stdout=subprocess.PIPE,
        )
        sampler = _RssSampler(child.pid)
        sampler.start()
        assert child.stdout is not None
        output = child.stdout.read()
        sampler.done.set()
        sampler.join()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if child.returncode != 0:
        raise RuntimeError(f"the {task} run failed (exit status {child.returncode}); its stderr is above")
    result: dict[str, Any] = json.loads(output.decode().strip().splitlines()[-1])
    size = source.stat().st_size
    # ru_maxrss is in KiB on Linux and bytes on macOS; on Linux it also counts the parent's RSS at spawn.
    maxrss = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    seconds = result.pop("seconds")
    return {
        "seconds": round(seconds, 6),
        "wall_seconds": round(wall, 3),
        "mb_per_s": round(size / MB / seconds, 2),
        "peak_rss_mib": round(result.pop("peak_rss_bytes") / MIB, 1),
        "ru_maxrss_mib": round(maxrss / MIB, 1),
        **result,
        "rss_timeline_mib": sampler.timeline(),
    }


# ---------------------------------------------------------------------------------------------------------
# Figures and reports.


def machine() -> dict[str, Any]:
    return _shared.machine(("pandas",))


def code_version() -> dict[str, Any]:
    """Which conveyor was measured: the commit, and the core module's own hash (it may be uncommitted)."""
    core = FUNCTIONS / "preprocess" / "core.py"
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", str(core)], capture_output=True, text=True)
    return {
        "commit": commit or None,
        "core_py_sha256": hashlib.sha256(core.read_bytes()).hexdigest(),
        "core_py_uncommitted_changes": bool(dirty.stdout.strip()),
    }


def _goal(value: float, goal: float, *, at_most: bool = False) -> dict[str, Any]:
    met = value <= goal if at_most else value >= goal
    return {"value": value, "goal": f"{'<=' if at_most else '>='} {goal}", "met": met}


def summarise(runs: dict[str, list[dict[str, Any]]], size: int) -> dict[str, Any]:
    medians: dict[str, dict[str, float]] = {}
    for task, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        medians[task] = {
            "seconds": round(seconds, 6),
            "mb_per_s": round(size / MB / seconds, 2),
            "peak_rss_mib": round(statistics.median(r["peak_rss_mib"] for r in results), 1),
            "max_peak_rss_mib": max(r["peak_rss_mib"] for r in results),
        }
    conveyor = medians["conveyor"]
    figures = {
        "conveyor_vs_pandas": _goal(
            round(conveyor["mb_per_s"] / medians["pandas"]["mb_per_s"], 3), GOAL_VS_PANDAS
        ),
        "conveyor_vs_raw_read": _goal(
            round(conveyor["mb_per_s"] / medians["raw_read"]["mb_per_s"], 4), GOAL_VS_RAW
        ),
        "conveyor_peak_rss_mib": _goal(conveyor["max_peak_rss_mib"], GOAL_RSS_MIB, at_most=True),
    }
    return {"median": medians, "figures": figures}


def flatness(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    if len(results) < 2:
        return None
    smallest, largest = results[0], results[-1]
    low = smallest["figures"]["conveyor_peak_rss_mib"]["value"]
    high = largest["figures"]["conveyor_peak_rss_mib"]["value"]
    return {
        "from": smallest["label"],
        "to": largest["label"],
        "peak_rss_mib": [low, high],
        "growth_mib": round(high - low, 1),
        **_goal(round(high / low, 3), GOAL_RSS_GROWTH, at_most=True),
    }


def _mark(figure: dict[str, Any], text: str) -> str:
    return f"{text} ✅" if figure["met"] else f"**{text} ❌ misses goal**"


def markdown(report: dict[str, Any]) -> str:
    m, code = report["machine"], report["code"]
    lines = [
        "# Preprocessing benchmark",
        "",
        f"Generated by `benchmarks/preprocess.py` on {report['finished_at']} in {report['total_seconds']:.0f} s "
        f"({report['config']['repeats']} repeat(s), medians shown).",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}, "
        f"pandas {m['pandas']}, {m['platform']}; load average at start {m['load_average_at_start'][0]}.",
        "",
        f"Conveyor at commit {(code['commit'] or 'unknown')[:12]}, core.py sha256 "
        + ", ".join(h[:12] for h in code["core_py_sha256_measured"])
        + (" (uncommitted changes)" if code["core_py_uncommitted_changes"] else "")
        + (" — **core.py changed during the run**" if code.get("core_py_changed_during_run") else "")
        + ".",
        "",
        "Throughput is input MB (10^6 bytes) per second of work inside a fresh process (interpreter start and "
        "imports excluded); peak RSS is that process's VmHWM in MiB, the highest of the repeats. `raw read` "
        "reads the file in 1 MiB chunks; `pandas` is `read_csv` + `to_csv`; `conveyor` is "
        "`preprocess.core.preprocess` writing three splits.",
        "",
        "| input | rows | raw read MB/s | pandas MB/s | conveyor MB/s | conveyor ÷ pandas (goal ≥ 1.5) "
        "| conveyor ÷ raw read (goal ≥ 0.3) | conveyor peak RSS MiB (goal ≤ 256) | pandas peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in report["results"]:
        med, fig = result["median"], result["figures"]
        vs_pandas, vs_raw, rss = (
            fig["conveyor_vs_pandas"],
            fig["conveyor_vs_raw_read"],
            fig["conveyor_peak_rss_mib"],
        )
        lines.append(
            f"| {result['label']} ({result['bytes']:,} bytes) | {result['rows']:,} "
            f"| {med['raw_read']['mb_per_s']:,.1f} | {med['pandas']['mb_per_s']:,.1f} "
            f"| {med['conveyor']['mb_per_s']:,.1f} "
            f"| {_mark(vs_pandas, format(vs_pandas['value'], '.2f') + 'x')} "
            f"| {_mark(vs_raw, format(vs_raw['value'], '.3f'))} "
            f"| {_mark(rss, format(rss['value'], '.0f'))} "
            f"| {med['pandas']['peak_rss_mib']:,.0f} |"
        )
    flat = report["summary"]["rss_flatness"]
    lines.append("")
    if flat:
        text = (
            f"{flat['peak_rss_mib'][0]:.0f} → {flat['peak_rss_mib'][1]:.0f} MiB "
            f"({flat['value']:.2f}x, goal ≤ {GOAL_RSS_GROWTH}x)"
        )
        lines.append(f"Conveyor peak RSS from {flat['from']} to {flat['to']}: {_mark(flat, text)}.")
    else:
        lines.append("Conveyor peak RSS flatness: needs two sizes (run with `--sizes 100MB,1GB`).")
    missed = report["summary"]["missed"]
    lines += ["", f"Goals missed: {', '.join(missed)}." if missed else "Every goal met.", ""]
    lines += [
        "Seconds per task (median): "
        + "; ".join(
            f"{r['label']}: " + ", ".join(f"{task} {r['median'][task]['seconds']:.1f} s" for task in TASKS)
            for r in report["results"]
        )
        + ".",
        "",
    ]
    return "\n".join(lines)


def run_benchmark(sizes: list[int], repeats: int, cache_dir: Path, output_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "preprocess",
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "code": code_version(),
        "config": {
            "sizes": [size_label(s) for s in sizes],
            "repeats": repeats,
            "seed": SEED,
            "generator_version": GENERATOR_VERSION,
            "tasks": list(TASKS),
            "goals": {
                "conveyor_vs_pandas": f">= {GOAL_VS_PANDAS}",
                "conveyor_vs_raw_read": f">= {GOAL_VS_RAW}",
                "conveyor_peak_rss_mib": f"<= {GOAL_RSS_MIB}",
                "rss_flatness": f"largest / smallest peak RSS <= {GOAL_RSS_GROWTH}",
            },
        },
        "results": [],
    }
    work_root = cache_dir / "work"
    work_root.mkdir(parents=True, exist_ok=True)
    for size in sorted(sizes):
        label = size_label(size)
        path, info = dataset(size, cache_dir)
        # Warm the page cache so the first timed task does not pay for the disk alone.
        _task_raw_read(path, work_root)
        runs: dict[str, list[dict[str, Any]]] = {task: [] for task in TASKS}
        for repeat in range(1, repeats + 1):
            for task in TASKS:
                progress(f"{label}: repeat {repeat}/{repeats}: {task} ...")
                result = measure(task, path, work_root)
                runs[task].append(result)
                progress(
                    f"{label}: repeat {repeat}/{repeats}: {task}: {result['seconds']:.2f} s, "
                    f"{result['mb_per_s']:.1f} MB/s, peak RSS {result['peak_rss_mib']:.0f} MiB"
                )
        pandas_rows = {r["rows"] for r in runs["pandas"]}
        conveyor_rows = {r["rows"] for r in runs["conveyor"]}
        if pandas_rows != {info["rows"]} or conveyor_rows != {info["rows"]}:
            raise RuntimeError(
                f"{label}: rows disagree: generated {info['rows']}, pandas read {pandas_rows}, "
                f"conveyor read {conveyor_rows}"
            )
        entry = {"label": label, "bytes": info["bytes"], "rows": info["rows"], "file": str(path)}
        entry.update(summarise(runs, info["bytes"]))
        entry["runs"] = runs
        report["results"].append(entry)
        figures = entry["figures"]
        progress(
            f"{label}: conveyor ÷ pandas {figures['conveyor_vs_pandas']['value']:.2f}, "
            f"÷ raw read {figures['conveyor_vs_raw_read']['value']:.3f}, "
            f"peak RSS {figures['conveyor_peak_rss_mib']['value']:.0f} MiB"
        )
    shutil.rmtree(work_root, ignore_errors=True)

    measured = {run["core_py_sha256"] for result in report["results"] for run in result["runs"]["conveyor"]}
    report["code"]["core_py_sha256_measured"] = sorted(measured)
    if len(measured) > 1:
        progress(
            f"warning: functions/preprocess/core.py changed during the run: {len(measured)} versions measured"
        )
        report["code"]["core_py_changed_during_run"] = True
    flat = flatness(report["results"])
    missed = [
        f"{name} at {r['label']}"
        for r in report["results"]
        for name, f in r["figures"].items()
        if not f["met"]
    ]
    if flat and not flat["met"]:
        missed.append("rss_flatness")
    report["summary"] = {"rss_flatness": flat, "missed": missed, "all_goals_met": not missed}
    report["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    report["total_seconds"] = round(time.perf_counter() - started, 1)

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "preprocess.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (output_dir / "preprocess.md").write_text(markdown(report))
    return report


def profile(size: int, cache_dir: Path, top: int = 15) -> None:
    """cProfile of conveyor on one file, in a fresh process, sorted by time spent in each function itself."""
    path, _ = dataset(size, cache_dir)
    work_root = cache_dir / "work"
    work_root.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="profile-", dir=work_root))
    try:
        subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "_profile", str(path), str(workdir), str(top)],
            check=True,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def child_profile(argv: list[str]) -> None:
    import cProfile
    import pstats

    source, workdir, top = Path(argv[0]), Path(argv[1]), int(argv[2])
    profiler = cProfile.Profile()
    result = profiler.runcall(_task_conveyor, source, workdir)
    print(f"conveyor on {source.name}: {result['seconds']:.2f} s under the profiler, {result['rows']:,} rows")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        child_main(argv[1:])
        return 0
    if argv[:1] == ["_profile"]:
        child_profile(argv[1:])
        return 0
    if argv[:1] == ["_generate"]:
        write_dataset(int(argv[1]), Path(argv[2]), int(argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        type=lambda text: [parse_size(s) for s in text.split(",") if s.strip()],
        default=[100 * MB, 1000 * MB],
        help="comma-separated input sizes (default: 100MB,1GB)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each task per size (default: 3)")
    parser.add_argument("--quick", action="store_true", help="one 2MB file, one repeat: a smoke test")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT, help="where results go")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="generated files (reused)")
    parser.add_argument("--profile", type=parse_size, metavar="SIZE", help="profile conveyor on one file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if importlib.util.find_spec("pandas") is None:
        parser.error('pandas is missing: pip install -e ".[bench]" (or make bench-preprocess)')
    if args.profile:
        profile(args.profile, args.cache_dir)
        return 0
    sizes, repeats = ([2 * MB], 1) if args.quick else (args.sizes, args.repeats)
    report = run_benchmark(sizes, repeats, args.cache_dir, args.output_dir)
    progress(f"done in {report['total_seconds']:.0f} s: {args.output_dir / 'preprocess.md'}")
    print((args.output_dir / "preprocess.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
