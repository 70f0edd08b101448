"""Fixtures shared by several test modules."""

import pytest
import torch


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
