"""The code SageMaker's jobs run, as they read it: training/ as the training jobs' ``sourcedir.tar.gz`` (and
``sourcedir-hf.tar.gz``, the same code with the Hugging Face packages' wheels, for jobs that fine-tune a base
model), and functions/common + functions/preprocess for the Processing jobs. `conveyor publish-code` uploads
them to a stack on AWS; local mode uploads them when its stack starts.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from conveyor.local.jobs import requirement_lines


class SourcedirError(RuntimeError):
    """The jobs' code cannot be packaged; the message says why (a wheel that cannot be downloaded)."""


# The packages the pretrained recipes need beyond the AWS PyTorch images (torch, numpy, Pillow), and every
# package they pull in, pinned (training/): the wheels travel in sourcedir-hf.tar.gz.
HF_REQUIREMENTS = "requirements-hf.txt"
HF_LOCK = "requirements-hf.lock"
# What the lock leaves to the image: torch (and so everything only torch needs) and numpy.
IMAGE_PROVIDES = frozenset({"torch", "numpy"})
HF_TOP_LEVEL = ("transformers", "tokenizers", "safetensors", "peft", "accelerate")


def publish_training_code(s3: Any, artifacts_bucket: str, root: Path, hf_wheels: bool = True) -> str:
    """Upload training/ where the pipeline's jobs look for it: ``sourcedir.tar.gz``, and
    ``sourcedir-hf.tar.gz`` for the jobs that fine-tune a base model (the preprocess function names it).

    Parameters
    ----------
    hf_wheels
        Put the Hugging Face packages' wheels in ``sourcedir-hf.tar.gz`` (about 30 MB; AWS's images lack
        them). Local mode passes False: its jobs run in conveyor's own environment, which has them.

    Returns
    -------
    str
        The S3 URI of ``sourcedir.tar.gz``.
    """
    from conveyor.local.cloud import make_functions_importable

    make_functions_importable(root)
    from common.naming import TRAINING_CODE_HF_KEY, TRAINING_CODE_KEY

    s3.put_object(Bucket=artifacts_bucket, Key=TRAINING_CODE_KEY, Body=training_sourcedir(root))
    s3.put_object(
        Bucket=artifacts_bucket, Key=TRAINING_CODE_HF_KEY, Body=training_sourcedir(root, hf_wheels=hf_wheels)
    )
    return f"s3://{artifacts_bucket}/{TRAINING_CODE_KEY}"


# The training image's platform (AWS PyTorch DLC: Linux x86_64, CPython 3.11), for the wheels of
# training/requirements.txt; a pure-Python wheel fits any.
WHEEL_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_28_x86_64")
WHEEL_PYTHON = "3.11"
WHEELHOUSE = "wheelhouse"


def training_sourcedir(root: Path, pip_index: Sequence[str] = (), hf_wheels: bool = False) -> bytes:
    """training/ as SageMaker's sourcedir.tar.gz (files at the archive's top level).

    The training container pip-installs the archive's requirements.txt before it starts train.py, and a
    network-isolated job cannot reach PyPI. So when training/requirements.txt names packages, their wheels
    for the training image's platform travel in the archive (``wheelhouse/``), and its requirements.txt
    installs from there alone (``--no-index --find-links wheelhouse``).

    Parameters
    ----------
    root
        The project (holding training/).
    pip_index
        pip options choosing where the wheels are downloaded from (pip's configuration when empty).
    hf_wheels
        Add the Hugging Face packages (training/requirements-hf.txt): their wheels, each package of
        training/requirements-hf.lock downloaded without its dependencies (the lock lists them all but
        torch and numpy, which the image has; pip would otherwise fetch a CUDA build of torch), and their
        pins in requirements.txt. pip resolves them at install against what the image has.

    Raises
    ------
    SourcedirError
        When a requirement has no wheel for the training image's platform.
    """
    training = root / "training"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(training.rglob("*")):
            relative = path.relative_to(training)
            if (
                "__pycache__" in relative.parts
                or any(part.startswith(".") for part in relative.parts)  # caches, editors' files
                or path.suffix == ".pyc"
                or path.name == "requirements.txt"
            ):
                continue
            tar.add(path, arcname=str(path.relative_to(training)), recursive=False)
        listed = training / "requirements.txt"
        requirements = listed.read_text() if listed.exists() else ""
        hf = (training / HF_REQUIREMENTS).read_text() if hf_wheels else ""
        if requirement_lines(requirements) or requirement_lines(hf):
            with tempfile.TemporaryDirectory() as wheels:
                if requirement_lines(requirements):
                    _download_wheels(listed, Path(wheels), pip_index)
                if requirement_lines(hf):
                    _download_wheels(training / HF_LOCK, Path(wheels), pip_index, with_dependencies=False)
                for wheel in sorted(Path(wheels).iterdir()):
                    tar.add(wheel, arcname=f"{WHEELHOUSE}/{wheel.name}", recursive=False)
            requirements = (
                "# Installed from the wheels beside this file: a network-isolated job cannot reach an index.\n"
                f"--no-index\n--find-links {WHEELHOUSE}\n" + requirements + hf
            )
        if listed.exists() or hf:
            _add_bytes(tar, "requirements.txt", requirements.encode())
        # Which commit this code came from, for the Model Registry (train.py reports it with a digest).
        _add_bytes(tar, "CODE_VERSION", f"{git_version(training)}\n".encode())
    return buffer.getvalue()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
    tar.addfile(info, io.BytesIO(data))


def _download_wheels(
    requirements: Path, destination: Path, pip_index: Sequence[str], with_dependencies: bool = True
) -> None:
    platforms = [option for platform in WHEEL_PLATFORMS for option in ("--platform", platform)]
    command = [
        sys.executable,
        *("-m", "pip", "download", "--quiet", "--only-binary=:all:", *platforms),
        *(() if with_dependencies else ("--no-deps",)),
        *("--python-version", WHEEL_PYTHON, "--implementation", "cp", "--dest", str(destination)),
        *pip_index,
        *("-r", str(requirements)),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if completed.returncode != 0:
        raise SourcedirError(
            f"the wheels of {requirements} for the training image (Linux x86_64, Python {WHEEL_PYTHON}) "
            f"could not be downloaded; every requirement needs such a wheel:\n{completed.stderr[-2000:]}"
        )


def git_version(directory: Path) -> str:
    """`git:<commit>` of the checkout `directory` is in (`+changes` if it differs from that commit), or
    `git:none` outside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "-C", str(directory), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "git:none"
    return f"git:{commit}{'+changes' if changes else ''}"


def preprocessing_code_files(root: Path) -> dict[str, Path]:
    """What a Processing job needs to run `python3 -m preprocess.processing`: functions/common and
    functions/preprocess, by their path below functions/ (the job's PYTHONPATH)."""
    functions = root / "functions"
    return {
        path.relative_to(functions).as_posix(): path
        for package in ("common", "preprocess")
        for path in sorted((functions / package).rglob("*.py"))
        if "__pycache__" not in path.parts
    }


def publish_preprocessing_code(s3: Any, artifacts_bucket: str, root: Path) -> str:
    """Upload the preprocessing code, one object per file, under the prefix the Processing jobs copy; remove
    files that are no longer part of it, so a job never imports a stale module."""
    from conveyor.local.cloud import make_functions_importable

    make_functions_importable(root)
    from common.naming import PREPROCESSING_CODE_PREFIX

    files = preprocessing_code_files(root)
    for relative, path in files.items():
        s3.put_object(
            Bucket=artifacts_bucket, Key=PREPROCESSING_CODE_PREFIX + relative, Body=path.read_bytes()
        )
    stale = [
        {"Key": obj["Key"]}
        for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=artifacts_bucket, Prefix=PREPROCESSING_CODE_PREFIX
        )
        for obj in page.get("Contents", [])
        if obj["Key"][len(PREPROCESSING_CODE_PREFIX) :] not in files
    ]
    for start in range(0, len(stale), 1000):
        s3.delete_objects(Bucket=artifacts_bucket, Delete={"Objects": stale[start : start + 1000]})
    return f"s3://{artifacts_bucket}/{PREPROCESSING_CODE_PREFIX}"


def hf_closure(top_level: Sequence[str] = HF_TOP_LEVEL) -> dict[str, str]:
    """The installed versions of `top_level` and of everything they require on the training image's
    platform (Linux x86_64, Python 3.11), not following torch and numpy (`IMAGE_PROVIDES`): what
    training/requirements-hf.lock pins (`scripts/lock_hf_wheels.py` writes it from this environment)."""
    import importlib.metadata as metadata

    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    environment = {
        **default_environment(),
        "python_version": WHEEL_PYTHON,
        "python_full_version": f"{WHEEL_PYTHON}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "extra": "",
    }
    found: dict[str, str] = {}
    pending = list(top_level)
    while pending:
        name = canonicalize_name(pending.pop())
        if name in found or name in IMAGE_PROVIDES:
            continue
        distribution = metadata.distribution(name)
        found[name] = distribution.version
        for line in distribution.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                pending.append(requirement.name)
    return dict(sorted(found.items()))
