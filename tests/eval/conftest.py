import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every evaluation test runs on one torch thread (tests/conftest.py's one_torch_thread)."""
