import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: it holds the real weights and measured notes")
    return SHARED


def pytest_configure(config):
    # Tests compile many small graphs; deterministic single-process compile keeps CI memory flat.
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
