"""The load test of the local HTTPS API at CI's size (issue 8): signed predictions from concurrent clients
while a new model takes over, with no failed request and no leak. Correctness only: how fast it goes is the
benchmark's business (`make bench-load`), never a test's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(420)
def test_clients_under_load_see_no_failure_while_a_new_model_takes_over(tmp_path):
    # --quick: 2 client threads, at least 15 s of load with an upload a third of the way in, one 3 s round
    # each way of steady load (the API, then the model server directly).
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "load.py"), "--quick", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "load.json").read_text())
    results = report["results"]
    update, figures = results["update"], results["figures"]

    # Every request was answered with one prediction per row: steady, and while the model changed.
    failures = [update["failure_samples"]] + [
        r[mode]["failure_samples"] for r in results["steady"] for mode in ("api", "direct")
    ]
    assert figures["failed_requests"]["value"] == 0, failures
    assert figures["failed_requests"]["model_server_directly"]["failed"] == 0, failures
    assert figures["failed_requests"]["of"] > 0
    for steady in results["steady"]:
        assert steady["api"]["answered"] > 0 and steady["direct"]["answered"] > 0

    # The update happened under the load, as a canary: the old model answered first, both during the
    # canary, the new one last.
    execution = update["execution"]
    assert execution["status"] == "SUCCEEDED" and execution["outcome"] == "deployed", (
        f"{execution['status']} {execution['error']}: {execution['cause']}"
    )
    assert execution["canary"]
    assert update["upload_at_s"] < execution["finished_s"] < update["seconds"]
    old, new = results["first_version"], results["second_version"]
    assert old != new
    assert set(update["versions_over_time"]) == {old, new}
    assert update["both_versions"]
    assert 0 < update["canary_window"]["new_version_share"] < 1

    # No leak: each process ends its window within the rule (the stack's process twice: over the steady
    # rounds, and with the update; the old and the new model server).
    memory = results["memory"]
    assert [w["process"].startswith("model server") for w in memory] == [False, False, True, True]
    for window in memory:
        assert window["measured"] and window["met"], window
        assert window["requests_answered_in_window"] > 0, window
    assert figures["memory_growth"]["met"]
    assert report["summary"]["all_goals_met"], report["summary"]
    assert "Every goal met." in (tmp_path / "load.md").read_text()
