import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(2)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
