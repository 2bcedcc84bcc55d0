"""What every layer shares: the one user-error class and the typed-options helper.

Public API::

    core_lib.UserError                          # base of every error that is the user's to fix
    core_lib.build_options(cls, given, owner)   # a typed options dataclass from a dict, checked
    core_lib.option_fields(cls)                 # (name, type, default) of an options dataclass
    core_lib.atomic_write(path, write)          # temporary file, fsync, rename
    core_lib.distributed                        # rank, world size, shards and collectives (torchrun or one process)
"""
from core_lib.errors import Preempted, RunInterrupted, UserError
from core_lib.files import OutputError, atomic_write
from core_lib.options import build_options, describe_type, finite_positive, option_fields, require, value_matches

__all__ = ["UserError", "RunInterrupted", "Preempted", "OutputError", "atomic_write", "build_options", "option_fields",
           "describe_type", "value_matches", "import_submodules", "require", "finite_positive"]


def import_submodules(package: str) -> None:
    """Import every module of ``package``, so that classes and loaders registering themselves at import are registered.

    A new solver or data set is then one module (plus its YAML): nothing else needs to import it.
    """
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        importlib.import_module(f"{package}.{info.name}")
