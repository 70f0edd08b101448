"""Fixtures shared by several test modules."""

import importlib.util
from pathlib import Path

import pytest
import torch

REPOSITORY = Path(__file__).resolve().parents[1]


def load_file(relative_path: str, name: str):
    """The Python file at `relative_path` (from the repository root) imported as module `name`:
    scripts and stand-ins that are not part of an installed package."""
    spec = importlib.util.spec_from_file_location(name, REPOSITORY / relative_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def float64_single_thread():
    """float64 default dtype and one torch thread for a module's tests.

    e3nn, the oracle of the SO(3) tests, builds its tables in the default dtype, so it must be
    float64 for tight comparisons; small float64 linear algebra is also faster on one thread.
    """
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
