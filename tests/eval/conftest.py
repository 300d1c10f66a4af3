import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny matmuls: one thread is as fast on an idle machine and far faster on a shared one
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
