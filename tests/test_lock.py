"""The installed environment is exactly ``requirements.lock``, and the lock covers pyproject.toml.

A fresh install once broke because only the direct dependencies were pinned (lmms-eval 0.7.3 vs
filelock 4). ``make test``/``make demo`` install the lock with hashes and no resolution; these tests
catch the next drift in CI: a dependency added to pyproject.toml but not locked (run ``make lock``),
a locked version outside pyproject's range, a package installed at another version or by hand, or a
broken dependency graph (``pip check``).
"""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"
PROJECT = "pact"
EXTRAS = ("dev", "eval")  # what `make lock` resolves and `make test` installs
LOCKED_PLATFORM = (
    sys.version_info[:2] == (3, 11) and platform.system() == "Linux" and platform.machine() == "x86_64"
)


def parse_lock(text: str) -> dict[str, str]:
    """{canonical name: exact version} of a pip requirements lock (``name==version \\`` lines)."""
    pins: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
        if m:
            name = canonicalize_name(m.group(1))
            if name in pins:
                raise ValueError(f"{LOCK.name}: {name} is pinned twice")
            pins[name] = m.group(2)
    return pins


def project_requirements(pyproject: dict, extras: tuple[str, ...] = EXTRAS) -> list[Requirement]:
    """The dependencies of the project plus the given extras, with self-references (``pact[eval]``)
    expanded."""
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    todo, seen, out = list(extras), set(), [Requirement(r) for r in project["dependencies"]]
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in optional.get(extra, []):
            req = Requirement(text)
            if canonicalize_name(req.name) == PROJECT:
                todo.extend(req.extras)
            else:
                out.append(req)
    return out


def lock_problems(
    pins: dict[str, str], requirements: list[Requirement], installed: dict[str, str]
) -> list[str]:
    """Every way ``installed`` ({name: version}) and ``requirements`` disagree with the lock ``pins``."""
    problems = []
    for req in requirements:
        name = canonicalize_name(req.name)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if name not in pins:
            problems.append(f"{req} is required by pyproject.toml but not in the lock (run `make lock`)")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"the lock pins {name}=={pins[name]}, outside pyproject.toml's {req}")
    for name, version in sorted(pins.items()):
        if name not in installed:
            problems.append(f"{name}=={version} is locked but not installed")
        elif installed[name] != version:
            problems.append(f"{name} {installed[name]} is installed, the lock pins {version}")
    for name in sorted(set(installed) - set(pins) - {PROJECT}):
        problems.append(f"{name} {installed[name]} is installed but not in the lock")
    return problems


def installed_distributions() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads(PYPROJECT.read_text())


# --- the checker itself can fail -----------------------------------------------------------------


def test_lock_problems_names_every_kind_of_drift():
    pins = {"torch": "2.14.1", "filelock": "3.20.0", "numpy": "2.1.0"}
    reqs = [Requirement("torch==2.14.1"), Requirement("filelock<4"), Requirement("newpkg>=1")]
    installed = {"torch": "2.14.1", "filelock": "4.0.1", "stray": "0.1", "pact": "0.1.0"}
    problems = lock_problems(pins, reqs, installed)
    assert problems == [
        "newpkg>=1 is required by pyproject.toml but not in the lock (run `make lock`)",
        "filelock 4.0.1 is installed, the lock pins 3.20.0",
        "numpy==2.1.0 is locked but not installed",
        "stray 0.1 is installed but not in the lock",
    ]
    assert lock_problems(pins, [Requirement("filelock>=4")], dict(pins)) == [
        "the lock pins filelock==3.20.0, outside pyproject.toml's filelock>=4"
    ]
    assert lock_problems(pins, reqs[:2], {**pins, "pact": "0.1.0"}) == []


def test_project_requirements_expand_extras():
    pyproject = {
        "project": {
            "dependencies": ["torch==2.14.1"],
            "optional-dependencies": {"eval": ["lmms-eval==0.7.3"], "dev": ["pact[eval]", "pytest>=8"]},
        }
    }
    names = [r.name for r in project_requirements(pyproject)]
    assert sorted(names) == ["lmms-eval", "pytest", "torch"]


def test_parse_lock_reads_pins_and_refuses_duplicates():
    text = "# comment\nfoo-bar==1.2 \\\n    --hash=sha256:ab\n    # via x\nBaz==3.0.post1\n"
    assert parse_lock(text) == {"foo-bar": "1.2", "baz": "3.0.post1"}
    with pytest.raises(ValueError, match="pinned twice"):
        parse_lock("a==1\nA==2\n")


# --- the real environment ------------------------------------------------------------------------


def test_lock_covers_pyproject_and_every_pin_has_a_hash():
    text = LOCK.read_text()
    pins = parse_lock(text)
    problems = lock_problems(pins, project_requirements(_pyproject()), dict(pins))
    assert problems == [], "\n".join(problems)
    # --require-hashes installs refuse a pin without a hash; check here so the message is clearer.
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text)
    unhashed = [b.split("==")[0] for b in blocks if "==" in b.split("\n")[0] and "--hash=sha256:" not in b]
    assert unhashed == []
    for tool in ("pip", "setuptools"):  # the installer and build backend are locked too
        assert tool in pins


@pytest.mark.skipif(not LOCKED_PLATFORM, reason="requirements.lock describes CPython 3.11 on Linux x86-64")
def test_installed_environment_is_the_lock():
    pins = parse_lock(LOCK.read_text())
    problems = lock_problems(pins, project_requirements(_pyproject()), installed_distributions())
    assert problems == [], "the environment drifted from requirements.lock:\n" + "\n".join(problems)


def test_pip_check_is_clean():
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
