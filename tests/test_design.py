"""The layers of docs/design.md: a package imports only from the layers below it."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ALLOWED = {
    "core_lib": set(),
    "sde_lib": {"core_lib"},
    "models": {"core_lib", "sde_lib"},
    "solvers": {"core_lib", "sde_lib"},
    "data_lib": {"core_lib", "models"},
    "evaluation": {"core_lib", "sde_lib", "models", "solvers", "data_lib"},
    "training": {"core_lib", "sde_lib", "models", "solvers", "data_lib", "evaluation"},
    "tasks_lib": {"core_lib", "sde_lib", "models", "solvers", "data_lib", "evaluation", "training"},
}


@pytest.mark.parametrize("package", ALLOWED)
def test_a_package_imports_only_from_the_layers_below(package):
    found = set()
    for path in (ROOT / package).glob("*.py"):
        found |= set(re.findall(r"^\s*(?:from|import) (\w+)", path.read_text(), re.M))
    ours = found & (set(ALLOWED) | {"benchmarks", "run"})
    assert ours - {package} <= ALLOWED[package]


def test_run_py_imports_only_the_application_and_the_error_class():
    found = set(re.findall(r"^\s*(?:from|import) (\w+)", (ROOT / "run.py").read_text(), re.M))
    assert found & set(ALLOWED) == {"core_lib", "tasks_lib"}
