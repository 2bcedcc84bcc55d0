"""Forward SDEs: VP, sub-VP, VE, the cosine VP and tabulated VP; marginals, priors, discretisations (docs/math.md §1–§3)."""
from sde_lib.sde import (SDE, SDES, VESDE, VPSDE, ReverseSDE, SDEError, TabulatedVPSDE, VPCosineSDE, batch_broadcast,
                         get_sde, sde_name, subVPSDE)

__all__ = ["SDE", "VPSDE", "subVPSDE", "VESDE", "VPCosineSDE", "TabulatedVPSDE", "ReverseSDE", "batch_broadcast",
           "SDEError", "SDES", "get_sde", "sde_name"]
