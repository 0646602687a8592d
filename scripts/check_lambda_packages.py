"""Fail if a built Lambda package (sam build output) carries what must never ship to Lambda.

Usage: python scripts/check_lambda_packages.py .aws-sam/build
"""

import sys
from pathlib import Path

FORBIDDEN = ("torch", "sagemaker", "moto", "conveyor", "numpy", "pandas")
LIMIT_BYTES = 250 * 1024 * 1024  # Lambda's unzipped package limit


def main(build_dir: str) -> int:
    functions = sorted(p for p in Path(build_dir).iterdir() if p.is_dir() and p.name.endswith("Function"))
    if not functions:
        print(f"no function packages under {build_dir}: did sam build run?", file=sys.stderr)
        return 1
    failed = False
    for package in functions:
        names = {p.name.split("-")[0].lower() for p in package.iterdir()}
        bad = sorted(n for n in names if n in FORBIDDEN)
        size = sum(f.stat().st_size for f in package.rglob("*") if f.is_file())
        print(
            f"{package.name}: {size / 2**20:.1f} MiB unzipped{'; FORBIDDEN: ' + ', '.join(bad) if bad else ''}"
        )
        failed |= bool(bad) or size > LIMIT_BYTES
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ".aws-sam/build"))
