"""What ``pip install .`` (not editable) installs: every package of the source tree.

An editable install reads the tree itself, so a package missing from pyproject.toml's list
goes unnoticed there and breaks ``import attndsl`` for every user of a wheel.  The first test
reads the list; the second builds the package as a wheel would hold it and compares its files
with the tree's.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
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
                    reason="building the package needs setuptools in this environment")
def test_the_built_package_holds_every_module_and_the_grammar(tmp_path):
    """setuptools' build_py, the step that fills a wheel, run on a copy of the tree (a
    build/ folder left in the tree would leak files into a build made there)."""
    source, built = tmp_path / "source", tmp_path / "built"
    for name in ("attndsl", *MAPPED.values()):
        shutil.copytree(ROOT / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    proc = subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()",
                           "--quiet", "build_py", "--build-lib", str(built)],
                          cwd=source, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = {p.relative_to(built).as_posix() for p in built.rglob("*") if p.is_file()}
    expected = {"attndsl/grammar/attn.lark"}
    for package, folder in _tree_packages().items():
        top = package.replace(".", "/")
        expected |= {f"{top}/{p.name}" for p in folder.glob("*.py")}
    assert sorted(expected - names) == []
