"""The preprocessing benchmark runs end to end on a small file and writes the figures the README quotes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip(
    "pandas", reason='the benchmark baseline needs the bench extra: pip install -e ".[bench]"'
)


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
