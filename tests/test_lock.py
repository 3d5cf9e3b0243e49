"""requirements.lock agrees with pyproject.toml.

The README's commands and .ci/run install through the lock (`pip install -c requirements.lock …`),
so a dependency added to pyproject.toml but not locked, or a range that the locked version no
longer satisfies, would install an unpinned or different release on a fresh machine. The lock is
refreshed with `scripts/lock` (docs/development.md).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
# The platform the lock is compiled for (scripts/lock): CPython 3.11 on Linux x86-64.
LOCK_ENVIRONMENT = {
    "python_version": "3.11",
    "python_full_version": "3.11.7",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}


def locked_versions(text: str) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        specifiers = list(requirement.specifier)
        assert len(specifiers) == 1 and specifiers[0].operator == "==", f"not a pin: {raw!r}"
        pins[canonicalize_name(requirement.name)] = Version(specifiers[0].version)
    return pins


def declared_requirements() -> list[tuple[str, Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [("dependencies", Requirement(line)) for line in project["dependencies"]]
    for extra, lines in project["optional-dependencies"].items():
        declared += [(f"[{extra}]", Requirement(line)) for line in lines]
    return declared


def applies_to_lock(requirement: Requirement) -> bool:
    if requirement.marker is None:
        return True
    return Marker(str(requirement.marker)).evaluate({**LOCK_ENVIRONMENT, "extra": ""})


def disagreements(pins: dict[str, Version], declared: list[tuple[str, Requirement]]) -> list[str]:
    found: list[str] = []
    for where, requirement in declared:
        if not applies_to_lock(requirement):
            continue
        name = canonicalize_name(requirement.name)
        if name not in pins:
            found.append(f"{requirement} ({where}) is not in requirements.lock")
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            found.append(f"{requirement} ({where}) but requirements.lock pins {pins[name]}")
    return found


def test_every_declared_dependency_is_pinned_within_its_range() -> None:
    pins = locked_versions(LOCK.read_text())
    assert disagreements(pins, declared_requirements()) == [], (
        "pyproject.toml and requirements.lock disagree; refresh the lock with scripts/lock"
    )


def test_the_lock_pins_the_cpu_torch_and_no_cuda_packages() -> None:
    pins = locked_versions(LOCK.read_text())
    assert str(pins["torch"]).endswith("+cpu")
    assert not [name for name in pins if name.startswith("nvidia-")]


@pytest.mark.parametrize(
    ("pyproject_line", "expected"),
    [
        ("fastapi>=99", "fastapi>=99 (dependencies) but requirements.lock pins"),
        ("left-pad-nowhere>=1", "left-pad-nowhere>=1 (dependencies) is not in requirements.lock"),
    ],
)
def test_a_disagreement_is_reported(pyproject_line: str, expected: str) -> None:
    pins = locked_versions(LOCK.read_text())
    found = disagreements(pins, [("dependencies", Requirement(pyproject_line))])
    assert len(found) == 1 and found[0].startswith(expected)


def test_the_readme_and_ci_install_through_the_lock() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -c requirements.lock "torch==2.13.0" -e ".[test]"' in readme
    assert 'pip install -c requirements.lock "torch==2.13.0" -e . ' in readme
    assert 'pip install -c requirements.lock "torch==2.13.0" -e ".[test]"' in ci
