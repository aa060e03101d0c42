"""The declared support range is the tested one: requirements/lowest.txt pins every declared lower bound, and the
lock that the README's commands install (requirements/lock.txt) lies inside every declared range."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parent.parent


def declared() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(line) for line in project["dependencies"]]
    return {canonicalize_name(requirement.name): requirement for requirement in requirements}


def pinned(lock: str) -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements" / lock).read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"{lock}: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def lower_bounds_script():
    spec = importlib.util.spec_from_file_location("lower_bounds", ROOT / "requirements" / "lower_bounds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lowest_lock_pins_every_declared_lower_bound():
    bounds = lower_bounds_script().lower_bounds()
    assert set(bounds) == set(declared()) - {"torch"}
    lowest = pinned("lowest.txt")
    for name, bound in bounds.items():
        assert lowest.get(name) == Version(bound), f"lowest.txt pins {name} {lowest.get(name)}, declared >={bound}"


@pytest.mark.parametrize("lock", ["lock.txt", "lowest.txt"])
def test_locks_lie_inside_every_declared_range(lock):
    pins = pinned(lock)
    assert "torch" not in pins  # installed first, from the Makefile's TORCH
    for name, requirement in declared().items():
        if name != "torch":
            assert name in pins and requirement.specifier.contains(pins[name]), f"{lock}: {name} {pins.get(name)}"


def test_main_lock_holds_what_the_readme_commands_need():
    pins = pinned("lock.txt")
    for needed in ("pytest", "hypothesis", "ruff", "matplotlib", "gguf", "hatchling", "editables"):
        assert needed in pins, f"lock.txt lacks {needed}: run make lock"


def test_a_dependency_without_a_lower_bound_is_refused(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["torch>=2.2", "transformers"]\n')
    with pytest.raises(ValueError, match="'transformers'.*no '>=' lower bound"):
        lower_bounds_script().lower_bounds(pyproject)
