"""Shared test helpers: the project root and scripts/ on sys.path, the real-data location, offline mode."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "scripts"))  # the tools import as modules: import report, prepare_data
SHARED = Path(os.environ.get("ENCODEREC_SHARED", ROOT.parent / "shared")) / "data"
LCREC = SHARED / "lcrec"
os.environ.setdefault("ENCODEREC_OFFLINE", "1")  # tests never touch the network


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is fastest and immune to OpenMP spin-waits on a busy machine."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def lcrec_or_skip(name: str) -> Path:
    path = LCREC / name
    if not path.is_dir():
        pytest.skip(f"real data {path} is absent (expected ../shared/data beside the checkout)")
    return path
