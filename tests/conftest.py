"""Shared fixtures: the real-data folder (``ONEBIT_TEST_DATA``) and the engine's kernel path."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def real_data_dir() -> Path:
    """The folder holding real datasets (e.g. ../shared/datasets); tests needing it skip without it."""
    root = os.environ.get("ONEBIT_TEST_DATA")
    if not root or not Path(root).is_dir():
        pytest.skip("set ONEBIT_TEST_DATA to a folder with real datasets (e.g. ../shared/datasets)")
    return Path(root)


@pytest.fixture
def restore_kernel_path():
    """Put back the engine's kernel path after a test that picks one (``kernels.set_path``)."""
    from onebit.engine import kernels

    before = kernels.current_path()
    yield
    kernels.set_path(before)
