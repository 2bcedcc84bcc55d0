"""Forward SDEs: VP, sub-VP and VE, their marginals, priors and discretisations (MATH.md §1–§3)."""
from sde_lib.sde import SDE, VESDE, VPSDE, ReverseSDE, batch_broadcast, subVPSDE

__all__ = ["SDE", "VPSDE", "subVPSDE", "VESDE", "ReverseSDE", "batch_broadcast"]
