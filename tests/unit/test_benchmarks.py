"""The benchmarks run end to end on small inputs and write the figures the README quotes."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"

pytest.importorskip(
    "pandas", reason='the benchmark baseline needs the bench extra: pip install -e ".[bench]"'
)
NEEDS = {
    "sklearn": 'the quality baseline needs scikit-learn, in the bench extra: pip install -e ".[bench]"',
    "flask": 'the model-server baseline needs Flask, in the bench extra: pip install -e ".[bench]"',
    "torch": 'the benchmark trains with torch, in the train extra: pip install -e ".[train]"',
    "moto": 'the end-to-end benchmark runs local mode, in the local extra: pip install -e ".[local]"',
}


def run_quick(
    script: str,
    output: Path,
    *needs: str,
    timeout: int = 170,
    args: Sequence[str] = (),
    report: str | None = None,
) -> dict:
    """Run benchmarks/<script>.py --quick into `output` (skipping without its baselines); its JSON report
    (`<report or script>.json`)."""
    for module in needs:
        if importlib.util.find_spec(module) is None:
            pytest.skip(NEEDS[module])
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{script}.py"), "--quick", "--output-dir", str(output), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((output / f"{report or script}.json").read_text())


@pytest.mark.timeout(30)
def test_quick_run_writes_figures_with_their_goals(tmp_path):
    output, cache = tmp_path / "results", tmp_path / "cache"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "preprocess.py"),
            "--quick",
            "--output-dir",
            str(output),
            "--cache-dir",
            str(cache),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr

    report = json.loads((output / "preprocess.json").read_text())
    assert {"cpu_model", "cores", "python", "pandas"} <= report["machine"].keys()
    assert report["code"]["core_py_sha256"]
    (result,) = report["results"]
    assert 2_000_000 <= result["bytes"] < 2_001_000
    assert result["rows"] > 10_000
    for task in ("raw_read", "pandas", "conveyor"):
        (measured,) = result["runs"][task]
        assert measured["seconds"] > 0
        assert measured["mb_per_s"] > 0
        assert measured["peak_rss_mib"] > 0
        assert result["median"][task]["mb_per_s"] > 0
    # The work was done, not skipped: every row read by both, and conveyor wrote its splits.
    assert result["runs"]["pandas"][0]["rows"] == result["rows"]
    assert result["runs"]["conveyor"][0]["rows"] == result["rows"]
    assert result["runs"]["conveyor"][0]["bytes_written"] > result["bytes"] * 0.9
    for name in ("conveyor_vs_pandas", "conveyor_vs_raw_read", "conveyor_peak_rss_mib"):
        figure = result["figures"][name]
        assert figure["value"] > 0
        assert isinstance(figure["met"], bool)
        assert figure["goal"].startswith((">=", "<="))
    assert isinstance(report["summary"]["all_goals_met"], bool)

    table = (output / "preprocess.md").read_text()
    assert "conveyor ÷ pandas" in table
    assert "2MB" in table
    # The generated input is cached where --cache-dir says, for the next run to reuse.
    assert len(list(cache.glob("*.csv"))) == 1


@pytest.mark.timeout(180)
def test_quick_quality_run_compares_conveyor_with_the_linear_baseline(tmp_path):
    output = tmp_path / "results"
    report = run_quick("quality", output, "sklearn", "torch")
    assert {"cpu_model", "cores", "python", "torch", "scikit-learn"} <= report["machine"].keys()
    assert report["code"]["core_py_sha256"] and report["code"]["training_sha256"]
    (result,) = report["results"]
    assert result["dataset"] == "iris" and result["task"] == "classification"
    assert result["rows"] == 150
    (repeat,) = result["repeats"]
    # The real pipeline ran: preprocessing split every row and ignored the row-ID column; train.py evaluated
    # on the same test split as the baseline.
    assert repeat["counts"]["rows_used"] == 150
    assert repeat["ignored"] == ["row_ref"]
    conveyor = repeat["conveyor"]["defaults"]
    assert conveyor["test_rows"] == repeat["baseline"]["test_rows"] == repeat["counts"]["test"] > 0
    assert conveyor["code_version"].startswith(f"sha256:{report['code']['training_sha256']}")
    for metric in ("accuracy", "macro_f1"):
        entry = result["metrics"][metric]
        # Iris is easy: both models beat the majority class (a third of the rows) by far.
        assert entry["baseline"]["mean"] > 0.6
        assert entry["conveyor"]["defaults"]["mean"] > 0.6
        assert isinstance(entry["conveyor"]["defaults"]["met"], bool)
    assert isinstance(report["summary"]["all_met"], bool)

    table = (output / "quality.md").read_text()
    assert "| iris | classification |" in table
    assert "LogisticRegression" in table


@pytest.mark.timeout(180)
def test_quick_pretrained_benchmark_trains_every_model_and_measures_each_figure(tmp_path):
    pytest.importorskip("transformers")
    report = run_quick("pretrained", tmp_path / "results", "torch")
    assert set(report["quality"]) == {
        "fine-tuned (full)",
        "fine-tuned (LoRA)",
        "BiLSTM (text recipe)",
        "bag of words (tabular recipe)",
    }
    assert all(run["peak_rss_mib"] > 0 for run in report["quality"].values())
    for figure in (report["training"], report["serving"]):
        assert figure["ratio"] > 0 and figure["met"] == (figure["ratio"] >= figure["goal"])
    # The artefact's handlers and the pipeline ran the same model: they give the same labels.
    assert report["serving"]["same_labels"] >= 0.9
    assert "| fine-tuned (LoRA) |" in (tmp_path / "results" / "pretrained.md").read_text()


@pytest.mark.timeout(180)
def test_quick_training_benchmark_measures_each_figure_against_its_baseline(tmp_path):
    output = tmp_path / "results"
    report = run_quick("train", output, "flask", "torch")
    assert {"cpu_model", "cores", "python", "torch", "flask"} <= report["machine"].keys()
    assert report["code"]["digest"] and "training/train.py" in report["code"]["files_sha256"]
    # A real model was trained and served: it answers better than chance, not merely at all.
    assert report["model"]["test_value"] > 0.5
    results = report["results"]

    loop = results["training_loop"]
    (conveyor,), (bare,) = loop["runs"]["conveyor"], loop["runs"]["bare"]
    assert conveyor["steps"] == bare["steps"] == loop["steps"] > 0
    assert conveyor["samples_per_s"] > 0 and bare["samples_per_s"] > 0

    payloads = {p["rows"]: p for p in results["model_server"]["payloads"]}
    assert set(payloads) == {1, 100}
    for payload in payloads.values():
        for kind in ("conveyor", "flask"):
            (served,) = payload["runs"][kind]
            assert served["requests"] == report["config"]["requests"]
            assert served["requests_per_s"] > 0
        # Keep-alive held: conveyor's server answered every request on the connection it came in on.
        assert payload["runs"]["conveyor"][0]["connections_closed_by_server"] == 0

    cases = {c["rows"]: c for c in results["proxy"]["cases"]}
    assert set(cases) == {1, 100}
    for case in cases.values():
        assert 0 < case["stubber"]["p50_ms"] <= case["stubber"]["p99_ms"]

    figures = [loop["figures"]["conveyor_vs_bare"]]
    figures += [p["figures"]["conveyor_vs_flask"] for p in payloads.values()]
    figures += [c["figures"]["proxy_p50_ms"] for c in cases.values()]
    for figure in figures:
        assert figure["value"] > 0
        assert isinstance(figure["met"], bool)
        assert figure["goal"].startswith((">=", "<="))
    assert report["summary"]["all_goals_met"] == all(f["met"] for f in figures)

    table = (output / "train.md").read_text()
    for heading in ("Training loop", "Model server", "Inference proxy"):
        assert heading in table


def _template_handlers() -> dict[str, str]:
    from conveyor.local.template import Stack

    stack = Stack(ROOT)
    return {f.logical_id: f.properties["Handler"] for f in stack.of_type("AWS::Serverless::Function")}


@pytest.mark.timeout(180)
def test_quick_lambda_benchmark_imports_every_handler_against_boto3(tmp_path):
    output = tmp_path / "results"
    # No sam build here: the packaged import and the package sizes must say so, not guess.
    report = run_quick(
        "lambda_cold", output, args=("--build-dir", str(tmp_path / "no-build")), report="lambda"
    )
    assert {"cpu_model", "cores", "python", "boto3", "aws-lambda-powertools"} <= report["machine"].keys()
    handlers = _template_handlers()
    assert {f["function"]: f["handler"] for f in report["config"]["functions"]} == handlers

    venv = {e["function"]: e for e in report["results"]["imports"]["venv"]["functions"]}
    assert set(venv) == set(handlers)
    for name, entry in venv.items():
        assert entry["module"] == handlers[name].rpartition(".")[0]
        assert entry["median"]["boto3_ms"] > 0 and entry["median"]["handler_ms"] > 0
        # The Lambda environment held: the handler brought boto3 and more, and Powertools' Tracer was on
        # (Tracing: Active) and loaded the X-Ray SDK, as it does when deployed.
        assert entry["modules_loaded"]["handler"] > entry["modules_loaded"]["boto3"]
        assert entry["xray_sdk_loaded"]
        assert entry["import_profile"]["beyond_boto3_by_package"]
        figure = entry["figures"]["cold_import_vs_boto3"]
        assert figure["value"] > 0
        assert isinstance(figure["met"], bool)
        assert figure["goal"] == "<= 1.5"
    assert "packaged" not in report["results"]["imports"]
    assert "no sam build" in report["results"]["skipped"]["packaged"]
    assert report["results"]["packages"]["built"] is False

    table = (output / "lambda.md").read_text()
    assert "Not measured: no sam build" in table
    assert "Not built" in table
    for name, entry in venv.items():
        (row,) = [line for line in table.splitlines() if line.startswith(f"| {name} | `{entry['module']}`")]
        assert ("missed" in row) != entry["figures"]["cold_import_vs_boto3"]["met"]


def test_lambda_package_sizes_come_from_the_build_and_show_stale_code(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("bench_lambda_cold", BENCHMARKS / "lambda_cold.py")
    assert spec is not None and spec.loader is not None
    lambda_cold = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lambda_cold)
    build = tmp_path / "build"
    package = build / "PreprocessFunction"
    shutil.copytree(ROOT / "functions", package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (package / "botocore").mkdir()
    (package / "botocore" / "endpoints.json").write_bytes(b"x" * 300_000)
    functions = [
        {"function": "PreprocessFunction", "code_uri": "functions/"},
        {"function": "EvaluateFunction", "code_uri": "functions/"},
    ]

    sizes = lambda_cold.package_sizes(functions, build)
    built, missing = sizes["functions"]
    assert built["bytes"] == sum(f.stat().st_size for f in package.rglob("*") if f.is_file())
    assert built["largest"][0][0] == "botocore"
    assert built["code_differs_from_source"] == []
    assert built["figures"]["unzipped_mib"]["met"]
    assert missing == {"function": "EvaluateFunction", "built": False}
    assert sizes["built"] is False

    (package / "preprocess" / "app.py").write_text("# edited after the build\n")
    (built,) = lambda_cold.package_sizes(functions[:1], build)["functions"]
    assert built["code_differs_from_source"] == ["preprocess/app.py"]


@pytest.mark.timeout(300)
def test_quick_end_to_end_run_times_upload_to_prediction_against_the_training(tmp_path):
    output = tmp_path / "results"
    report = run_quick("end_to_end", output, "moto", "torch", timeout=280)
    assert {"cpu_model", "cores", "python", "moto", "torch"} <= report["machine"].keys()
    (run,) = report["results"]["repeats"]
    assert run["outcome"]["outcome"] == "deployed"
    assert run["predictions"] == report["config"]["prediction_rows"]
    # The baseline is the same training: the job's code, channels and hyperparameters, run directly,
    # reach the job's own test metric.
    assert "sagemaker_program" in run["training_job"]["hyperparameters"]
    assert {"train", "validation", "test", "code"} <= set(run["training_job"]["channels"])
    assert run["direct"]["same_metric_as_job"]
    # The phases account for the whole end-to-end time.
    assert sum(run["phases_seconds"].values()) == pytest.approx(run["end_to_end_seconds"], abs=0.01)
    figure = report["results"]["figures"]["end_to_end_vs_training"]
    assert figure["value"] > 0
    assert isinstance(figure["met"], bool)
    assert figure["goal"] == "<= 1.5"
    assert report["summary"]["all_goals_met"] == figure["met"]

    table = (output / "end_to_end.md").read_text()
    assert "upload → first successful prediction" in table
    assert ("missed" in table) != figure["met"]


def test_the_readme_quotes_the_results_as_they_are():
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / "readme_tables.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr


def test_a_missed_goal_stays_marked_missed_in_the_readme(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(BENCHMARKS / "results", results, ignore=shutil.ignore_patterns("*.md"))
    train = json.loads((results / "train.json").read_text())
    train["results"]["training_loop"]["figures"]["conveyor_vs_bare"]["met"] = False
    (results / "train.json").write_text(json.dumps(train))
    (results / "lambda.json").unlink()  # a table without results stays as it was
    readme = tmp_path / "README.md"
    shutil.copyfile(ROOT / "README.md", readme)

    run = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "readme_tables.py"),
            "--results",
            str(results),
            "--readme",
            str(readme),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "lambda: no" in run.stderr
    text = readme.read_text()
    (row,) = [line for line in text.splitlines() if line.startswith("| `train.fit` samples/s")]
    assert row.endswith("— **missed** |")
    original = (ROOT / "README.md").read_text()
    start = original.index("<!-- bench:lambda")
    end = original.index("<!-- /bench:lambda -->")
    assert original[start:end] in text


def _load_benchmark(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("bench_load", BENCHMARKS / "load.py")
    assert spec is not None and spec.loader is not None
    load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load)
    return load


def test_the_load_test_counts_every_failure_and_sees_which_version_answered(monkeypatch):
    load = _load_benchmark(monkeypatch)
    # (start, latency, status, model version or the error): as the client process records them.
    records = [
        [100.0, 0.010, 200, "v1"],
        [100.5, 0.020, 200, "v1"],
        [101.0, 0.030, 200, "v2"],
        [101.2, 0.040, 200, "v1"],
        [101.5, 0.050, 0, "ConnectionError('reset')"],
        [101.6, 0.010, -1, '{"predictions": []}'],  # a 200 without one prediction per row
        [101.8, 0.020, 503, '{"error": {}}'],
        [102.0, 0.030, 200, "v2"],
        [103.0, 0.040, 200, "v2"],
    ]
    run = {"started_at": 100.0, "stopped_at": 104.0, "records": records}
    summary = load.summarise(run)
    assert (summary["requests"], summary["answered"], summary["failed"]) == (9, 6, 3)
    assert summary["failures_by_status"] == {"0": 1, "-1": 1, "503": 1}
    assert summary["requests_per_s"] == 1.5
    assert summary["p50_ms"] == 30.0 and summary["p99_ms"] == summary["max_ms"] == 40.0
    assert summary["versions"] == {"v1": 3, "v2": 3}

    update = load.describe_update(run, 1.0, "v1", {"version": "v2"})
    assert update["both_versions"]
    assert update["versions_over_time"] == {
        "v1": {"answered": 3, "first_s": 0.0, "last_s": 1.2},
        "v2": {"answered": 3, "first_s": 1.0, "last_s": 3.0},
    }
    # Both answered from the new version's first answer to the old one's last: one of each.
    assert update["canary_window"] == {"from_s": 1.0, "to_s": 1.2, "new_version_share": 0.5}
    assert update["timeline_1s"][1] == {"from_s": 1.0, "versions": {"v2": 1, "v1": 1}, "failed": 3}
    # The new version never answering, or the old one answering last, is not a clean takeover.
    assert not load.describe_update(run, 1.0, "v1", {"version": "v3"})["both_versions"]
    backwards = {**run, "records": [*records, [103.5, 0.01, 200, "v1"]]}
    assert not load.describe_update(backwards, 1.0, "v1", {"version": "v2"})["both_versions"]


def test_the_load_test_judges_memory_growth_by_its_rule(monkeypatch):
    load = _load_benchmark(monkeypatch)
    sampler = load.MemorySampler()
    mib = 1 << 20
    sampler.samples = {
        1: [(10.0, 100 * mib), (20.0, 110 * mib), (30.0, 119 * mib)],
        2: [(10.0, 100 * mib), (20.0, 125 * mib), (30.0, 121 * mib)],
    }
    steady = load.memory_window("steady", sampler, 1, 10.0, 30.0, 50)
    assert steady["met"] and steady["growth_percent"] == 19.0 and steady["peak_mib"] == 119.0
    grown = load.memory_window("grown", sampler, 2, 10.0, 30.0, 50)
    assert not grown["met"] and grown["growth_mib"] == 21.0 and grown["peak_mib"] == 125.0
    # A window that ends before the last sample ends at the sample before it.
    assert load.memory_window("early", sampler, 2, 10.0, 25.0, 10)["after_mib"] == 125.0
    assert load.memory_window("gone", sampler, 3, 10.0, 30.0, 0) == {
        "process": "gone",
        "pid": 3,
        "measured": False,
    }
    assert load.rss_bytes(os.getpid()) > 0
