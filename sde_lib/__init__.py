"""Forward SDEs: VP, sub-VP and VE, their marginals, priors and discretisations (docs/math.md §1–§3)."""
from sde_lib.sde import SDE, SDES, VESDE, VPSDE, ReverseSDE, SDEError, batch_broadcast, get_sde, sde_name, subVPSDE

__all__ = ["SDE", "VPSDE", "subVPSDE", "VESDE", "ReverseSDE", "batch_broadcast", "SDEError", "SDES", "get_sde",
           "sde_name"]
