"""The local stack each integration module runs against: one per module, with the template parameters the
module names in `CLOUD_PARAMETERS` (over local mode's own defaults)."""

from pathlib import Path

import pytest

from conveyor.local.cloud import LocalCloud

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cloud(request, tmp_path_factory):
    parameters = getattr(request.module, "CLOUD_PARAMETERS", None)
    local = LocalCloud(ROOT, workdir=tmp_path_factory.mktemp("cloud"), parameters=parameters)
    local.start()
    yield local
    local.stop()
