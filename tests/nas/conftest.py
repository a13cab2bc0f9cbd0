"""Shared fixtures of the search tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Every search test trains and times on one torch thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
