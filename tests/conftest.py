"""Shared test fixtures: where ../shared is, and small image subsets.

Tests that need ../shared (real weights and images) skip with a reason when it is absent, as in
a user's clone; CI sets PRISM_PROBE_REQUIRE_SHARED=1, which turns that skip into a failure so
real-weight tests never silently skip there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PRISM_PROBE_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def require_shared(*parts: str) -> Path:
    """The path under ../shared, or skip (fail in CI) when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        msg = f"needs {path} (the project's shared weights and images beside the checkout)"
        if os.environ.get("PRISM_PROBE_REQUIRE_SHARED") == "1":
            pytest.fail(msg + "; CI must have it")
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def shared_weights() -> Path:
    return require_shared("weights")


@pytest.fixture(scope="session")
def imagenet_dir() -> Path:
    return require_shared("data", "imagenet-sample")


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    return require_shared("data", "cifar10-small")


@pytest.fixture(scope="session")
def imagenet16(imagenet_dir) -> list[Path]:
    """16 ImageNet sample images in a fixed order (every 16th file)."""
    files = sorted(imagenet_dir.glob("*.JPEG"))
    return files[::16][:16]
