"""Shared fixtures: the real assets in ../shared (skipped with a reason when absent) and
tiny models built from configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from coalora_edge.tiny import build_tiny_model

SHARED = Path(os.environ.get("COALORA_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def shared_asset(relative: str) -> Path:
    path = SHARED / "assets" / relative
    if not path.exists():
        pytest.skip(f"{path} not found: real-model tests need the project's shared/ folder beside the checkout "
                    "(or COALORA_SHARED pointing at it)")
    return path


@pytest.fixture(scope="session")
def tinystories_dir() -> Path:
    return shared_asset("models/TinyStories-656K")


@pytest.fixture(scope="session")
def tinystories_text() -> Path:
    return shared_asset("text/tinystories_dev.txt")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Build (once per session) a tiny model folder of the given architecture."""
    built: dict[tuple, Path] = {}

    def build(arch: str = "llama", **sizes) -> Path:
        key = (arch, tuple(sorted(sizes.items())))
        if key not in built:
            built[key] = build_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, **sizes)
        return built[key]

    return build
