"""The benchmarks run end to end on small inputs and write the figures the README quotes."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip(
    "pandas", reason='the benchmark baseline needs the bench extra: pip install -e ".[bench]"'
)
NEEDS = {
    "sklearn": 'the quality baseline needs scikit-learn, in the bench extra: pip install -e ".[bench]"',
    "flask": 'the model-server baseline needs Flask, in the bench extra: pip install -e ".[bench]"',
    "torch": 'the benchmark trains with torch, in the train extra: pip install -e ".[train]"',
}


def run_quick(script: str, output: Path, *needs: str, timeout: int = 170) -> dict:
    """Run benchmarks/<script>.py --quick into `output` (skipping without its baselines); its JSON report."""
    for module in needs:
        if importlib.util.find_spec(module) is None:
            pytest.skip(NEEDS[module])
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--quick", "--output-dir", str(output)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((output / f"{script}.json").read_text())


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
