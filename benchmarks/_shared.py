"""What every benchmark records about the machine it ran on, and how it writes its results (the scripts import
this from their own folder)."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def machine(packages: Sequence[str] = ()) -> dict[str, Any]:
    """CPU model, cores, memory, the load when the run started, Python, and the versions of `packages`."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        first = Path("/proc/meminfo").read_text().splitlines()[0]
        memory = round(int(first.split()[1]) / (1 << 20), 1)
    versions: dict[str, str | None] = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        **versions,
    }


def write_results(report: dict[str, Any], started: float, output_dir: Path, name: str, render: Any) -> None:
    """Stamp the end of a run on `report` (load average, time, duration since `started`, a perf_counter) and
    write `<name>.json` and `<name>.md` (`render(report)`) into `output_dir`."""
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{name}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (output_dir / f"{name}.md").write_text(render(report))


def code_identity(root: Path, files: Sequence[Path], pathspecs: Sequence[str]) -> dict[str, Any]:
    """Which conveyor was measured: the commit, a digest of `files` (paths and contents), and the files
    under `pathspecs` with uncommitted changes."""
    digests = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    digest = hashlib.sha256("".join(f"{n}\0{h}\0" for n, h in sorted(digests.items())).encode()).hexdigest()
    git = ["git", "-C", str(root)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", *pathspecs], capture_output=True, text=True
    ).stdout
    return {
        "commit": commit or None,
        "digest": digest,
        "uncommitted_changes": sorted(line[3:] for line in dirty.splitlines() if line.strip()),
    }


def code_sentence(
    code: dict[str, Any], digest_of: str, changed: str = "the code changed during the run"
) -> str:
    """The report's sentence naming what was measured: the commit, the digest of `digest_of`, files with
    uncommitted changes, and `changed` (in bold) when the code changed while the benchmark ran."""
    changes = code["uncommitted_changes"]
    return (
        f"Conveyor at commit {(code['commit'] or 'unknown')[:12]}, {digest_of} digest {code['digest'][:12]}"
        + (f" (uncommitted changes in {', '.join(changes)})" if changes else "")
        + (f" — **{changed}**" if code.get("changed_during_run") else "")
        + "."
    )


def quiet_local_stack() -> None:
    """Keep the local stack's request logs and moto's failed-state errors off a benchmark's output, as
    `conveyor demo` does."""
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("werkzeug", "botocore", "urllib3", "smart_open", "localcloud.lambda", "localcloud.gateway"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("moto").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message="No application metrics to publish")


def mark(figure: dict[str, Any], text: str) -> str:
    """A figure's text with its verdict: met, or missed in bold."""
    return f"{text} ✅ met" if figure["met"] else f"**{text} ❌ missed**"
