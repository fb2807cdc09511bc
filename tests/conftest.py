import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(2)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def offset_routing():
    """Register the stateful test routing ``OffsetConfig`` (name "test-offset") for one test only."""
    from hf_moe_routing import ROUTING_METHODS, register_routing
    from hf_moe_routing.testing import OffsetConfig

    register_routing(OffsetConfig)
    yield OffsetConfig
    ROUTING_METHODS.unregister(OffsetConfig.routing_type)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread: tiny models train faster so (and do not fight other
    processes for cores). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
