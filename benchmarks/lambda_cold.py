"""Lambda cold start: each handler module's import time in a fresh interpreter ÷ that of ``import boto3``.

For every function of template.yaml (its ``Handler``, e.g. ``preprocess.app.handler`` → ``preprocess.app``),
in one run:

``handler``   a fresh interpreter imports the handler's module, timed from the ``import`` statement to its
              end (interpreter start excluded), with the environment Lambda gives the function: the
              template's variables (Globals and the function's own, resolved as local mode resolves them),
              ``AWS_LAMBDA_FUNCTION_NAME``, ``LAMBDA_TASK_ROOT`` and the rest, so that Powertools' Tracer is
              on (``Tracing: Active``) and patches boto3 as it does when deployed;
``boto3``     the same interpreter, environment and import path importing ``boto3`` alone: the floor every
              Python function that calls AWS pays.

Each repeat runs the two back to back, in alternating order; a ratio is the median of the repeats' ratios.
Goal: ≤ 1.5 for every handler. Two import paths:

``venv``      the project's virtualenv (this interpreter) with ``functions/`` first on ``sys.path``;
``packaged``  what Lambda runs: the function's ``sam build`` package (``.aws-sam/build/<Function>``, made by
              ``make lint-infra``) first on ``sys.path``, then boto3 and its dependencies as the Lambda
              runtime provides them (this virtualenv's copies), on the template's runtime (``python3.12``,
              from pyenv or PATH), without site-packages. Skipped, and said so, without a build or that
              Python.

Bytecode is compiled once before the timed runs (into a temporary ``-X pycache_prefix``, so nothing is
written into the checkout, the virtualenv or the build) and the file cache is warm: the figures are a warm
host's cold start, the import work itself. One ``-X importtime`` run per handler says where the time goes.
Also measured: each package's unzipped size (Lambda's limit: 250 MiB) and whether its code is that of
``functions/``. Results go to ``benchmarks/results/lambda.{json,md}``; a figure that misses its goal is marked
as missing it.

Usage::

    python benchmarks/lambda_cold.py                 # 7 repeats (about a minute on a 2-core machine)
    python benchmarks/lambda_cold.py --repeats 3
    python benchmarks/lambda_cold.py --quick         # one repeat: a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import _shared

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
FUNCTIONS = ROOT / "functions"
DEFAULT_BUILD = ROOT / ".aws-sam" / "build"
DEFAULT_OUTPUT = BENCHMARKS / "results"

GOAL_VS_BOTO3 = 1.5
LIMIT_UNZIPPED_MIB = 250.0  # Lambda's limit on a function's unzipped package
DEFAULT_REPEATS = 7
BASELINE = "boto3"
# What the Lambda Python runtime itself provides (on its own sys.path, after the function's package).
RUNTIME_PACKAGES = ("boto3", "botocore", "s3transfer", "jmespath", "dateutil", "urllib3", "six")
MODES = ("venv", "packaged")
CHILD_TIMEOUT = 120

TIMED_IMPORT_STARTS = "--- the timed import starts ---"
# Runs in the fresh interpreter. Nothing is imported before the timed import but sys and time (built in);
# json only after it. The marker on stderr separates the interpreter's own start from the timed import in
# an -X importtime profile.
CHILD = """\
import sys, time
sys.path[:0] = {paths!r}
before = set(sys.modules)
sys.stderr.write({marker!r} + "\\n")
sys.stderr.flush()
started = time.perf_counter()
__import__({module!r})
seconds = time.perf_counter() - started
handler = getattr(sys.modules[{module!r}], {attribute!r}, None) if {attribute!r} else None
loaded = sorted(set(sys.modules) - before)
import json
print(json.dumps({{"seconds": seconds, "modules_loaded": len(loaded), "loaded": loaded,
                   "xray_loaded": "aws_xray_sdk" in sys.modules, "handler_found": callable(handler)}}))
"""


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# What to import, where, and with which environment.


def lambda_functions() -> list[dict[str, Any]]:
    """Every AWS::Serverless::Function of template.yaml, as local mode reads it: handler, environment, ..."""
    sys.path.insert(0, str(ROOT / "src"))  # conveyor's template reader, without needing it installed
    from conveyor.local.template import Stack

    stack = Stack(ROOT)
    functions = []
    for function in stack.of_type("AWS::Serverless::Function"):
        props = function.properties
        module, _, attribute = props["Handler"].rpartition(".")
        functions.append(
            {
                "function": function.logical_id,
                "name": function.attributes["Ref"],
                "handler": props["Handler"],
                "module": module,
                "attribute": attribute,
                "runtime": props.get("Runtime", "python3.12"),
                "memory": int(props.get("MemorySize", 128)),
                "tracing": props.get("Tracing", "PassThrough"),
                "code_uri": props.get("CodeUri", "functions/"),
                "environment": stack.function_environment(function.logical_id),
                "region": stack.region,
            }
        )
    return functions


def lambda_environment(function: dict[str, Any], task_root: Path, runtime_dir: Path | None) -> dict[str, str]:
    """The variables Lambda sets for the function, and the template's; nothing inherited but PATH."""
    region = function["region"]
    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "TZ": ":UTC",
        "AWS_REGION": region,
        "AWS_DEFAULT_REGION": region,
        "AWS_LAMBDA_FUNCTION_NAME": function["name"],
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(function["memory"]),
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_EXECUTION_ENV": f"AWS_Lambda_{function['runtime']}",
        "LAMBDA_TASK_ROOT": str(task_root),
        "LAMBDA_RUNTIME_DIR": str(runtime_dir or task_root),
        "_HANDLER": function["handler"],
        **function["environment"],
    }
    if function["tracing"] == "Active":
        environment["AWS_XRAY_CONTEXT_MISSING"] = "LOG_ERROR"
        environment["AWS_XRAY_DAEMON_ADDRESS"] = "169.254.79.129:2000"
    return environment


def runtime_python(runtime: str) -> str | None:
    """The interpreter of the template's runtime (`python3.12`): pyenv's newest, else one on PATH that runs."""
    version = runtime.removeprefix("python")
    candidates = sorted(
        Path.home().glob(f".pyenv/versions/{version}*/bin/python{version}"),
        key=lambda p: [int(x) if x.isdigit() else 0 for x in p.parts[-3].split(".")],
    )
    on_path = shutil.which(f"python{version}")
    for candidate in [*(str(p) for p in reversed(candidates)), *([on_path] if on_path else [])]:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            check = subprocess.run(
                [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if check.returncode == 0 and check.stdout.strip() == version:
                return candidate
    return None


def runtime_directory(work: Path) -> Path:
    """A stand-in for the Lambda runtime's own packages (boto3 and what it needs): links to this venv's."""
    directory = work / "runtime"
    directory.mkdir(parents=True, exist_ok=True)
    for name in RUNTIME_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None:
            raise RuntimeError(f"{name} is not installed in {sys.prefix}")
        if spec.submodule_search_locations:
            source = Path(next(iter(spec.submodule_search_locations)))
        else:
            assert spec.origin is not None
            source = Path(spec.origin)
        (directory / source.name).symlink_to(source)
    return directory


class ImportPath:
    """One way of importing: which interpreter, which flags, which directories first on sys.path."""

    def __init__(self, mode: str, python: str, flags: list[str], paths: dict[str, list[Path]]) -> None:
        self.mode = mode
        self.python = python
        self.flags = flags
        self.paths = paths  # by function: the handler's sys.path head
        self.baseline_paths = paths  # by function: boto3's

    def command(self, function: str, module: str, attribute: str, *extra: str) -> list[str]:
        paths = self.baseline_paths[function] if module == BASELINE else self.paths[function]
        code = CHILD.format(
            paths=[str(p) for p in paths], module=module, attribute=attribute, marker=TIMED_IMPORT_STARTS
        )
        return [self.python, *self.flags, *extra, "-c", code]


def import_paths(
    functions: list[dict[str, Any]], build_dir: Path, work: Path, python: str | None
) -> tuple[dict[str, ImportPath], dict[str, str]]:
    """The import paths this machine can measure, and why any other is skipped."""
    paths: dict[str, ImportPath] = {}
    skipped: dict[str, str] = {}
    venv = ImportPath(
        "venv",
        sys.executable,
        ["-I", "-X", f"pycache_prefix={work / 'pycache-venv'}"],
        {f["function"]: [FUNCTIONS] for f in functions},
    )
    paths["venv"] = venv
    missing = [f["function"] for f in functions if not (build_dir / f["function"]).is_dir()]
    runtimes = {f["runtime"] for f in functions}
    if missing:
        skipped["packaged"] = (
            f"no sam build of {', '.join(missing)} under {_shown(build_dir)} (make lint-infra builds them)"
        )
    elif len(runtimes) != 1:
        skipped["packaged"] = f"the functions have several runtimes ({', '.join(sorted(runtimes))})"
    else:
        (runtime,) = runtimes
        interpreter = python or runtime_python(runtime)
        if interpreter is None:
            skipped["packaged"] = f"{runtime} (the functions' runtime) not found in pyenv or on PATH"
        else:
            runtime_dir = runtime_directory(work)
            empty = work / "task-root"
            empty.mkdir(exist_ok=True)
            packaged = ImportPath(
                "packaged",
                interpreter,
                ["-I", "-S", "-X", f"pycache_prefix={work / 'pycache-packaged'}"],
                {f["function"]: [build_dir / f["function"], runtime_dir] for f in functions},
            )
            # A function whose code imports boto3 and nothing else: an empty package, the runtime's boto3.
            packaged.baseline_paths = {f["function"]: [empty, runtime_dir] for f in functions}
            paths["packaged"] = packaged
    return paths, skipped


def _shown(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(ROOT))
    return str(path)


# ---------------------------------------------------------------------------------------------------------
# Measuring.


def run_import(path: ImportPath, function: dict[str, Any], module: str, cwd: Path) -> dict[str, Any]:
    """Import `module` in a fresh interpreter; the seconds the import took, measured inside it."""
    task_root = path.paths[function["function"]][0]
    runtime_dir = path.paths[function["function"]][-1] if path.mode == "packaged" else None
    attribute = function["attribute"] if module != BASELINE else ""
    completed = subprocess.run(
        path.command(function["function"], module, attribute),
        env=lambda_environment(function, task_root, runtime_dir),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"{path.mode}: importing {module} for {function['function']} failed:\n{completed.stderr[-3000:]}"
        )
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    if module != BASELINE and not result["handler_found"]:
        raise RuntimeError(f"{module} has no callable {function['attribute']} (template.yaml's Handler)")
    return result


def import_profile(
    path: ImportPath, function: dict[str, Any], cwd: Path, baseline_modules: set[str]
) -> dict[str, Any]:
    """One `-X importtime` import of the handler: where its time goes beyond what `import boto3` loads.

    Self time of each module the import loaded, by the profile's own clock (slower than the timed runs'),
    summed by top-level package; ``beyond_boto3`` counts only modules that ``import boto3`` alone does not
    load, which is what makes the handler's import dearer than the baseline.
    """
    task_root = path.paths[function["function"]][0]
    runtime_dir = path.paths[function["function"]][-1] if path.mode == "packaged" else None
    completed = subprocess.run(
        path.command(function["function"], function["module"], function["attribute"], "-X", "importtime"),
        env=lambda_environment(function, task_root, runtime_dir),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{path.mode}: profiling {function['module']} failed:\n{completed.stderr[-3000:]}")
    own = {function["module"].split(".")[0], "common"}  # the function's code (CodeUri functions/)
    loaded = set(json.loads(completed.stdout.strip().splitlines()[-1])["loaded"])
    everything: dict[str, int] = defaultdict(int)
    beyond: dict[str, int] = defaultdict(int)
    timed = False
    for line in completed.stderr.splitlines():
        timed = timed or line == TIMED_IMPORT_STARTS
        # "import time: self [us] | cumulative | imported package", one line per module. A module looked
        # for and not found (an optional dependency) has a line too: only loaded ones count.
        if not timed or not line.startswith("import time:") or "self [us]" in line:
            continue
        fields = line[len("import time:") :].split("|")
        self_us, name = int(fields[0]), fields[2].strip()
        if name not in loaded:
            continue
        top = name.split(".")[0]
        if top in own:
            package = "the function's code"
        elif top in sys.stdlib_module_names or top.startswith("_"):
            package = "standard library"
        else:
            package = top
        everything[package] += self_us
        if name not in baseline_modules:
            beyond[package] += self_us

    def ranked(times: dict[str, int]) -> list[list[Any]]:
        return [[name, round(us / 1000, 1)] for name, us in sorted(times.items(), key=lambda item: -item[1])]

    return {
        "total_ms": round(sum(everything.values()) / 1000, 1),
        "beyond_boto3_ms": round(sum(beyond.values()) / 1000, 1),
        "self_ms_by_package": ranked(everything),
        "beyond_boto3_by_package": ranked(beyond),
        "top_level_loaded": sorted({name.split(".")[0] for name in loaded}),
    }


def measure_imports(
    functions: list[dict[str, Any]], paths: dict[str, ImportPath], repeats: int, work: Path
) -> dict[str, Any]:
    """For every import path and function: `repeats` pairs (boto3, handler) in alternating order."""
    cwd = work / "cwd"
    cwd.mkdir(exist_ok=True)
    results: dict[str, Any] = {}
    for mode, path in paths.items():
        progress(f"{mode}: compiling bytecode (untimed) ...")
        for function in functions:
            baseline_modules = set(run_import(path, function, BASELINE, cwd)["loaded"])
            run_import(path, function, function["module"], cwd)
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {
            f["function"]: {"boto3": [], "handler": []} for f in functions
        }
        for repeat in range(repeats):
            for function in functions:
                order = (BASELINE, function["module"])
                for module in order if repeat % 2 == 0 else order[::-1]:
                    result = run_import(path, function, module, cwd)
                    runs[function["function"]]["boto3" if module == BASELINE else "handler"].append(result)
            progress(f"{mode}: repeat {repeat + 1}/{repeats} done")
        entries = []
        for function in functions:
            measured = runs[function["function"]]
            boto3_ms = [r["seconds"] * 1000 for r in measured["boto3"]]
            handler_ms = [r["seconds"] * 1000 for r in measured["handler"]]
            ratios = [h / b for h, b in zip(handler_ms, boto3_ms, strict=True)]
            ratio = round(statistics.median(ratios), 3)
            entry = {
                "function": function["function"],
                "module": function["module"],
                "median": {
                    "boto3_ms": round(statistics.median(boto3_ms), 1),
                    "handler_ms": round(statistics.median(handler_ms), 1),
                },
                "pair_ratios": [round(r, 3) for r in ratios],
                "modules_loaded": {
                    "boto3": measured["boto3"][-1]["modules_loaded"],
                    "handler": measured["handler"][-1]["modules_loaded"],
                },
                "xray_sdk_loaded": measured["handler"][-1]["xray_loaded"],
                "runs": {
                    "boto3_ms": [round(x, 2) for x in boto3_ms],
                    "handler_ms": [round(x, 2) for x in handler_ms],
                },
                "figures": {"cold_import_vs_boto3": _goal(ratio, GOAL_VS_BOTO3, at_most=True)},
                "import_profile": import_profile(path, function, cwd, baseline_modules),
            }
            entries.append(entry)
            progress(
                f"{mode}: {function['module']}: {entry['median']['handler_ms']:.0f} ms, boto3 "
                f"{entry['median']['boto3_ms']:.0f} ms: {ratio:.2f}x"
            )
        results[mode] = {
            "python": path.python,
            "python_version": subprocess.run(
                [path.python, "-c", "import platform; print(platform.python_version())"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip(),
            "sys_path_head": {
                f["function"]: [_shown(p) for p in path.paths[f["function"]]] for f in functions
            },
            "functions": entries,
        }
    return results


def outside_package(imports: dict[str, Any], packages: dict[str, Any]) -> None:
    """Mark, in the venv profiles, the packages a handler imported that its Lambda package does not hold."""
    venv = imports.get("venv")
    if venv is None or not packages.get("built"):
        return
    shipped = {p["function"]: set(p["top_level"]) for p in packages["functions"]}
    for entry in venv["functions"]:
        held = shipped.get(entry["function"], set()) | set(RUNTIME_PACKAGES)
        extra = [
            [name, ms]
            for name, ms in entry["import_profile"]["self_ms_by_package"]
            if name not in held and name not in ("standard library", "the function's code")
        ]
        entry["import_profile"]["not_in_lambda_package"] = extra


# ---------------------------------------------------------------------------------------------------------
# Package sizes.


def _build_stamp(build_dir: Path) -> float | None:
    # sam build writes the template it built beside the packages, last.
    stamp = build_dir / "template.yaml"
    return stamp.stat().st_mtime if stamp.exists() else None


def package_sizes(functions: list[dict[str, Any]], build_dir: Path) -> dict[str, Any]:
    """Each function's built package: unzipped bytes, its largest parts, and whether its code is functions/'s."""
    if not build_dir.is_dir():
        return {"build_dir": _shown(build_dir), "built": False, "functions": []}
    entries = []
    for function in functions:
        package = build_dir / function["function"]
        if not package.is_dir():
            entries.append({"function": function["function"], "built": False})
            continue
        sizes: dict[str, int] = defaultdict(int)
        files = 0
        for directory, _, names in os.walk(package):
            for name in names:
                path = Path(directory) / name
                if path.is_symlink():
                    continue
                top = path.relative_to(package).parts[0]
                sizes[top] += path.stat().st_size
                files += 1
        total = sum(sizes.values())
        code_root = ROOT / function["code_uri"]
        differing = sorted(
            str(source.relative_to(code_root))
            for source in code_root.rglob("*")
            if source.is_file()
            and "__pycache__" not in source.parts
            and source.suffix != ".pyc"
            and (
                not (package / source.relative_to(code_root)).is_file()
                or (package / source.relative_to(code_root)).read_bytes() != source.read_bytes()
            )
        )
        # A distribution's parts (botocore and botocore-1.44.8.dist-info) count as one.
        grouped: dict[str, int] = defaultdict(int)
        for name, size in sizes.items():
            grouped[name.split("-")[0].removesuffix(".py")] += size
        largest = sorted(grouped.items(), key=lambda item: -item[1])[:5]
        mib = round(total / (1 << 20), 1)
        entries.append(
            {
                "function": function["function"],
                "built": True,
                "bytes": total,
                "mib": mib,
                "files": files,
                "top_level": sorted(grouped),
                "largest": [[name, round(size / (1 << 20), 1)] for name, size in largest],
                "code_differs_from_source": differing,
                "figures": {"unzipped_mib": _goal(mib, LIMIT_UNZIPPED_MIB, at_most=True)},
            }
        )
    # sam build writes the template it built beside the packages: its time is the build's.
    stamp = build_dir / "template.yaml"
    built_at = dt.datetime.fromtimestamp((stamp if stamp.exists() else build_dir).stat().st_mtime, dt.UTC)
    return {
        "build_dir": _shown(build_dir),
        "built": all(e["built"] for e in entries),
        "built_at": built_at.isoformat(timespec="seconds"),
        "functions": entries,
    }


# ---------------------------------------------------------------------------------------------------------
# Figures and reports.


def _goal(value: float, goal: float, *, at_most: bool = False) -> dict[str, Any]:
    met = value <= goal if at_most else value >= goal
    return {"value": value, "goal": f"{'<=' if at_most else '>='} {goal}", "met": met}


def machine() -> dict[str, Any]:
    return _shared.machine(("boto3", "botocore", "aws-lambda-powertools", "aws-xray-sdk", "smart_open"))


def code_version() -> dict[str, Any]:
    """Which conveyor was measured: the commit, and a digest of the Lambda code and template.yaml."""
    measured = sorted(
        p for p in FUNCTIONS.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )
    measured.append(ROOT / "template.yaml")
    return _shared.code_identity(ROOT, measured, ("functions", "template.yaml"))


def _profile_text(profile: dict[str, Any], top: int = 4) -> str:
    parts = [f"{name} {ms:.0f}" for name, ms in profile["beyond_boto3_by_package"][:top] if ms >= 0.5]
    return f"{profile['beyond_boto3_ms']:.0f} of {profile['total_ms']:.0f} ms: " + ", ".join(parts)


def markdown(report: dict[str, Any]) -> str:
    m, code, config = report["machine"], report["code"], report["config"]
    imports, packages = report["results"]["imports"], report["results"]["packages"]
    lines = [
        "# Lambda cold-start benchmark",
        "",
        f"Generated by `benchmarks/lambda_cold.py{' --quick' if config['quick'] else ''}` on "
        f"{report['finished_at']} in {report['total_seconds']:.0f} s ({config['repeats']} repeat(s); medians; "
        "each ratio is the median of the ratios of imports made back to back, in alternating order).",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}, "
        f"boto3 {m['boto3']}, Powertools {m['aws-lambda-powertools']}, X-Ray SDK {m['aws-xray-sdk']}, "
        f"smart_open {m['smart_open']}, {m['platform']}; load average at start "
        f"{m['load_average_at_start'][0]}, at the end {m.get('load_average_at_end', ['?'])[0]}.",
        "",
        _shared.code_sentence(code, "functions/ and template.yaml"),
        "",
        "Each import runs in a fresh interpreter with the function's Lambda environment (template.yaml's "
        "variables, `AWS_LAMBDA_FUNCTION_NAME`, `LAMBDA_TASK_ROOT`, ...; Powertools' Tracer is on, as with "
        "`Tracing: Active`, and patches boto3), timed inside it from the `import` statement to its end. "
        "The baseline is `import boto3` in the same interpreter, environment and import path. Bytecode is "
        "compiled and files are cached before the timed runs: a warm host's cold start.",
        "",
    ]
    titles = {
        "venv": "the project's virtualenv, `functions/` first on `sys.path`",
        "packaged": "as packaged: the function's `sam build` output first on `sys.path`, then the runtime's "
        "boto3, on the template's runtime, no site-packages",
    }
    for number, mode in enumerate(MODES, start=1):
        lines += [f"## {number}. Import: {titles[mode]}", ""]
        if mode not in imports:
            lines += [f"Not measured: {report['results']['skipped'].get(mode, 'skipped')}.", ""]
            continue
        measured = imports[mode]
        lines += [
            f"Python {measured['python_version']} (`{measured['python']}`).",
            "",
            f"| function | handler module | `import boto3` ms | handler import ms | modules loaded "
            f"(boto3 / handler) | handler ÷ boto3 (goal ≤ {GOAL_VS_BOTO3:g}x) | where the import time goes "
            "beyond `import boto3`'s modules (`-X importtime` self time, ms) |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for entry in measured["functions"]:
            figure = entry["figures"]["cold_import_vs_boto3"]
            lines.append(
                f"| {entry['function']} | `{entry['module']}` | {entry['median']['boto3_ms']:.0f} "
                f"| {entry['median']['handler_ms']:.0f} "
                f"| {entry['modules_loaded']['boto3']} / {entry['modules_loaded']['handler']} "
                f"| {_shared.mark(figure, format(figure['value'], '.2f') + 'x')} "
                f"| {_profile_text(entry['import_profile'])} |"
            )
        lines.append("")
        extra = {
            e["function"]: e["import_profile"].get("not_in_lambda_package")
            for e in measured["functions"]
            if e["import_profile"].get("not_in_lambda_package")
        }
        if extra:
            named = sorted({name for found in extra.values() for name, _ in found})
            lines += [
                "Imported from the virtualenv but not in the Lambda packages (nor the runtime's boto3): "
                + ", ".join(f"`{n}`" for n in named)
                + f" ({', '.join(sorted(extra))}); the packaged import does without them.",
                "",
            ]
        lines += [
            "The repeats' ratios: "
            + "; ".join(
                f"{e['function']}: " + ", ".join(format(r, ".2f") for r in e["pair_ratios"])
                for e in measured["functions"]
            )
            + ".",
            "",
        ]
    lines += ["## 3. Package size", ""]
    if not packages["built"] and not packages["functions"]:
        lines += [f"Not built: no `{packages['build_dir']}` (`make lint-infra` runs `sam build`).", ""]
    else:
        lines += [
            f"Unzipped size of each `{packages['build_dir']}/<Function>` (sam build's output; CodeUri "
            f"`functions/` and `functions/requirements.txt`), built {packages['built_at']}. Lambda's limit: "
            f"{LIMIT_UNZIPPED_MIB:g} MiB unzipped."
            + (
                " **sam build rewrote the packages during the run.**"
                if packages.get("changed_during_run")
                else ""
            ),
            "",
            "| function | unzipped MiB | files | largest parts (MiB) | code as in functions/ |",
            "|---|---:|---:|---|---|",
        ]
        for entry in packages["functions"]:
            if not entry["built"]:
                lines.append(f"| {entry['function']} | not built | | | |")
                continue
            figure = entry["figures"]["unzipped_mib"]
            differs = entry["code_differs_from_source"]
            lines.append(
                f"| {entry['function']} | {_shared.mark(figure, format(entry['mib'], '.1f'))} | {entry['files']:,} "
                f"| {', '.join(f'{n} {s:.1f}' for n, s in entry['largest'])} "
                f"| {'yes' if not differs else '**no**: ' + ', '.join(differs[:5]) + (' ...' if len(differs) > 5 else '')} |"
            )
        lines.append("")
    missed = report["summary"]["missed"]
    lines += [f"Goals missed: {', '.join(missed)}." if missed else "Every goal met.", ""]
    return "\n".join(lines)


def run_benchmark(
    repeats: int, build_dir: Path, output_dir: Path, quick: bool, python: str | None
) -> dict[str, Any]:
    started = time.perf_counter()
    functions = lambda_functions()
    report: dict[str, Any] = {
        "benchmark": "lambda",
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "code": code_version(),
        "config": {
            "repeats": repeats,
            "quick": quick,
            "build_dir": _shown(build_dir),
            "functions": [
                {k: f[k] for k in ("function", "handler", "runtime", "tracing")} for f in functions
            ],
            "goals": {
                "cold_import_vs_boto3": f"<= {GOAL_VS_BOTO3}",
                "unzipped_mib": f"<= {LIMIT_UNZIPPED_MIB} (Lambda's limit)",
            },
        },
    }
    built_before = _build_stamp(build_dir)
    work = Path(tempfile.mkdtemp(prefix="bench-lambda-"))
    try:
        paths, skipped = import_paths(functions, build_dir, work, python)
        for mode, reason in skipped.items():
            progress(f"{mode}: not measured: {reason}")
        imports = measure_imports(functions, paths, repeats, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    packages = package_sizes(functions, build_dir)
    if _build_stamp(build_dir) != built_before:
        progress("warning: sam build rewrote the packages during the run")
        packages["changed_during_run"] = True
    outside_package(imports, packages)
    report["results"] = {"imports": imports, "skipped": skipped, "packages": packages}

    if code_version()["digest"] != report["code"]["digest"]:
        progress("warning: functions/ or template.yaml changed during the run")
        report["code"]["changed_during_run"] = True
    missed = [
        f"{mode} {e['function']} cold_import_vs_boto3"
        for mode, measured in imports.items()
        for e in measured["functions"]
        if not e["figures"]["cold_import_vs_boto3"]["met"]
    ]
    missed += [
        f"{e['function']} unzipped_mib"
        for e in packages["functions"]
        if e["built"] and not e["figures"]["unzipped_mib"]["met"]
    ]
    report["summary"] = {"missed": missed, "all_goals_met": not missed}
    _shared.write_results(report, started, output_dir, "lambda", markdown)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--repeats", type=int, default=DEFAULT_REPEATS, help=f"pairs per handler (default: {DEFAULT_REPEATS})"
    )
    parser.add_argument("--quick", action="store_true", help="one repeat: a smoke test")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT, help="where results go")
    parser.add_argument(
        "--build-dir", type=Path, default=DEFAULT_BUILD, help="sam build's output (default: .aws-sam/build)"
    )
    parser.add_argument(
        "--lambda-python",
        help="the interpreter of the functions' runtime (default: python3.12 from pyenv/PATH)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if importlib.util.find_spec("yaml") is None:
        parser.error("PyYAML is missing: pip install -e . (or make bench-lambda)")
    repeats = 1 if args.quick else args.repeats
    report = run_benchmark(repeats, args.build_dir, args.output_dir, args.quick, args.lambda_python)
    progress(f"done in {report['total_seconds']:.0f} s: {args.output_dir / 'lambda.md'}")
    print((args.output_dir / "lambda.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
