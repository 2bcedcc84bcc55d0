import pytest
import torch

from models import MixtureScore, ring_mixture
from sde_lib import SDES

# Two cores on CI: keep torch from oversubscribing them when pytest-xdist runs two workers.
torch.set_num_threads(1)


@pytest.fixture(params=list(SDES))
def sde_name(request) -> str:
    """Each registered SDE's name in turn (``sde_lib.SDES``): a new SDE joins every test that takes this fixture."""
    return request.param


@pytest.fixture
def recording_ring_score():
    """A factory ``make(sde, predicts_noise) -> (score, times)``: the exact ring's score under ``sde`` as a plain
    function that appends the time of each evaluation to ``times``, carrying the ring's ``sigma_data`` and declaring
    ``predicts_noise`` (None: nothing, as a plain callable declares)."""
    def make(sde, predicts_noise):
        exact = MixtureScore(sde, ring_mixture())
        times = []

        def score(x, t):
            times.append(t[0].item())
            return exact(x, t)

        if predicts_noise is not None:
            score.predicts_noise = predicts_noise
        score.sigma_data = exact.sigma_data
        return score, times
    return make
