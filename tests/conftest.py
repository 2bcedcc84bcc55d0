import pytest
import torch

from sde_lib import SDES

# Two cores on CI: keep torch from oversubscribing them when pytest-xdist runs two workers.
torch.set_num_threads(1)


@pytest.fixture(params=list(SDES))
def sde_name(request) -> str:
    """Each registered SDE's name in turn (``sde_lib.SDES``): a new SDE joins every test that takes this fixture."""
    return request.param
