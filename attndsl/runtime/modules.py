"""Generated modules: content-hashed source written to a cache directory and imported.

The cache lives in ``$ATTNDSL_CACHE`` (default ``~/.cache/attndsl``); a module's file name is
the hash of its source, so equal specs share one module and one Triton compilation.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from attndsl.codegen.triton import generate
from attndsl.ir.tile import TileKernel

VERSION = "0.1.0"
_LOADED: dict[str, ModuleType] = {}


def cache_dir() -> Path:
    root = os.environ.get("ATTNDSL_CACHE") or os.path.join(Path.home(), ".cache", "attndsl")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def spec_hash(kernel: TileKernel) -> str:
    """Hash of everything the kernel's code depends on (not of captured tensor values)."""
    return hashlib.sha256(repr(kernel).encode()).hexdigest()[:16]


def module_source(kernel: TileKernel) -> str:
    return generate(kernel, spec_hash(kernel), VERSION)


def write_module(source: str, path: str | os.PathLike) -> Path:
    """Write atomically (a concurrent reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(source)
    os.replace(tmp, path)
    return path


def import_path(path: str | os.PathLike, name: str | None = None) -> ModuleType:
    """Import a generated module from a file."""
    path = Path(path)
    name = name or f"attndsl_generated_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_source(source: str, prefix: str = "k") -> ModuleType:
    """Import generated source, cached by content hash (in memory and in cache_dir())."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    key = f"{prefix}_{digest}"
    if key not in _LOADED:
        path = cache_dir() / f"{key}.py"
        if not path.exists() or path.read_text() != source:
            write_module(source, path)
        _LOADED[key] = import_path(path, f"attndsl_generated_{key}")
    return _LOADED[key]


def load_kernel_module(kernel: TileKernel) -> ModuleType:
    """The imported module for a kernel, generating and caching it on first use."""
    return load_source(module_source(kernel))
