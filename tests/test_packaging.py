"""What ``pip install .`` (not editable) installs: every package of the source tree.

An editable install reads the tree itself, so a package missing from pyproject.toml's list
goes unnoticed there and breaks ``import attndsl`` for every user of a wheel.  The first test
reads the list; the second builds the wheel (no network: ``--no-deps --no-build-isolation``)
and compares its files with the tree's.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAPPED = {"attndsl.codegen": "codegen", "attndsl.grammar": "grammar"}  # package-dir of pyproject


def _tree_packages() -> dict[str, Path]:
    """Dotted package name -> folder, for every folder with an __init__.py."""
    roots = {"attndsl": ROOT / "attndsl", **{k: ROOT / v for k, v in MAPPED.items()}}
    out = {}
    for prefix, folder in roots.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            out[".".join((prefix, *rel))] = init.parent
    return out


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_pyproject_lists_every_package_of_the_tree():
    tool = _pyproject()["tool"]["setuptools"]
    assert tool["package-dir"] == MAPPED
    assert sorted(tool["packages"]) == sorted(_tree_packages())


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None,
                    reason="building the wheel needs setuptools in this environment")
def test_the_built_wheel_holds_every_module_and_the_grammar(tmp_path):
    source = tmp_path / "source"  # a copy: a build/ folder left in the tree would leak files
    for name in ("attndsl", *MAPPED.values()):
        shutil.copytree(ROOT / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "--quiet", "-w", str(tmp_path), str(source)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("attndsl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"attndsl/grammar/attn.lark"}
    for package, folder in _tree_packages().items():
        top = package.replace(".", "/")
        expected |= {f"{top}/{p.name}" for p in folder.glob("*.py")}
    assert sorted(expected - names) == []
