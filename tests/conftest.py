"""Shared test fixtures: small models, the ../shared assets (tests that need them skip without them)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU our Triton kernels can only run in Triton's interpreter, and the switch is read when triton_scan
# is first imported, which any test touching the scan backends may do: set it before every other import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist runs one worker per core; more intra-op threads than cores makes OpenMP spin and tiny ops
# take milliseconds instead of microseconds.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WDM_SHARED", REPO.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test saying what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared assets are only on developer and CI machines)")
    return path


def needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
