import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and mamba_ssm (run tests/gpu/run_all.sh on the device)")
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):  # this hook sees the whole session's items
            item.add_marker(skip)


@pytest.fixture
def record():
    """Append a result line to $GPU_RESULTS (the device run collects them for
    benchmarks/results/)."""
    path = os.environ.get("GPU_RESULTS")

    def _record(line: str) -> None:
        print(line)
        if path:
            with open(path, "a") as f:
                f.write(line + "\n")
    return _record
