"""The error every bad model setting raises."""
from __future__ import annotations

from core_lib import UserError

__all__ = ["ModelError"]


class ModelError(UserError):
    """Bad model settings: an unknown network kind or parameterisation, sizes that do not fit, bad mixture parameters."""
