"""Resolve a SPEC argument of the CLI into something the compiler takes.

SPEC forms:
  ``examples/alibi.py``           a file defining ``make(B, H, Lq, Lkv, device)`` (returning
                                  ``{"score_mod": ..., "mask_mod": ...}``) or module-level
                                  ``score_mod`` / ``mask_mod`` / ``cascade``
  ``path.py:name`` / ``pkg.mod:name``   one attribute: a score_mod (5 args), a mask_mod
                                  (4 args), a Cascade, or a make() factory
  ``file.attn`` / ``file.attn:name``    a text spec (the only one in the file, or the named one)
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from attndsl.errors import AttnDSLError
from attndsl.frontend.flex import lower_flex
from attndsl.frontend.trace import defined_at, raised_at
from attndsl.ir.cascade import Cascade


class SpecLoadError(AttnDSLError, ValueError):
    """SPEC does not name a loadable spec; the message says what was looked for."""


@dataclass
class LoadedSpec:
    """A spec ready to compile: ``build(B, H, Lq, Lkv, device)`` -> (cascade, captured)."""

    name: str
    build: Callable[..., tuple[Cascade, dict[str, torch.Tensor]]]
    enable_gqa: bool = False
    is_flex: bool = True


def import_spec_file(path: Path) -> ModuleType:
    """Import a spec file; its own folder is importable meanwhile (for shared helpers)."""
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        return _import_file(path)
    finally:
        sys.path.remove(folder)


def _import_file(path: Path) -> ModuleType:
    name = f"attndsl_spec_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SpecLoadError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:  # its own file:line
        raise SpecLoadError(f"{path}: importing it raised {type(err).__name__}: {err}") from err
    except (Exception, SystemExit) as err:  # a sys.exit() in user code is no exit of ours
        raise SpecLoadError(f"{raised_at(err, str(path))}: importing {path} raised "
                            f"{type(err).__name__}: {err}") from err
    return module


def _flex_builder(make: Callable[..., dict]) -> Callable[..., tuple[Cascade, dict]]:
    def build(B: int = 1, H: int = 1, Lq: int = 16, Lkv: int = 16, device: Any = "cpu"):
        fns = _call_make(make, B, H, Lq, Lkv, device)
        flex = lower_flex(fns.get("score_mod"), fns.get("mask_mod"))
        return flex.cascade, flex.captured
    return build


MAKE_SIGNATURE = "make(B, H, Lq, Lkv, device)"
_PROGRAMS = ("score_mod", "mask_mod")


def _call_make(make: Callable[..., Any], *args: Any) -> dict:
    """``make(B, H, Lq, Lkv, device)``: a dict with a score_mod and/or a mask_mod.

    The factory is user code: whatever it raises is reported with its function and line (as
    an import error is), never as a traceback out of attndsl."""
    where = defined_at(make)
    try:
        inspect.signature(make).bind(*args)
    except TypeError as err:
        raise SpecLoadError(f"{where}: a spec factory is called as {MAKE_SIGNATURE}, but "
                            f"{getattr(make, '__name__', 'it')} cannot take those arguments "
                            f"({err})") from None
    except ValueError:  # no introspectable signature: let the call decide
        pass
    try:
        fns = make(*args)
    except (Exception, SystemExit) as err:  # user code: keep the cause, say where from
        raise SpecLoadError(f"{raised_at(err, where)}: {MAKE_SIGNATURE} raised "
                            f"{type(err).__name__}: {err}") from err
    if not isinstance(fns, dict) or not set(fns) <= set(_PROGRAMS):
        raise SpecLoadError(f"{where}: {MAKE_SIGNATURE} must return a dict with the keys "
                            f"'score_mod' and/or 'mask_mod', got {_describe(fns)}")
    for key, fn in fns.items():
        if fn is not None and not callable(fn):
            raise SpecLoadError(f"{where}: {MAKE_SIGNATURE} returned {key!r}: {_describe(fn)}; "
                                f"expected a function or None")
    return fns


def _describe(x: Any) -> str:
    if isinstance(x, dict):
        return f"a dict with keys {sorted(map(repr, x))}"
    return f"{type(x).__name__} {x!r}"[:120]


def _from_attr(obj: Any, where: str) -> LoadedSpec:
    if isinstance(obj, Cascade):
        return LoadedSpec(obj.name, lambda *a, **k: (obj, {}), is_flex=False)
    if callable(obj):
        try:
            nargs = len(inspect.signature(obj).parameters)
        except (TypeError, ValueError):
            nargs = -1
        name = getattr(obj, "__name__", where)
        if nargs == 5:
            return LoadedSpec(name, _flex_builder(lambda *a: {"score_mod": obj}))
        if nargs == 4:
            return LoadedSpec(name, _flex_builder(lambda *a: {"mask_mod": obj}))
        return LoadedSpec(where, _flex_builder(obj))  # a make(B, H, Lq, Lkv, device) factory
    raise SpecLoadError(f"{where} is a {type(obj).__name__}; expected a score_mod, mask_mod, "
                        f"Cascade or make() factory")


def _from_module(module: ModuleType, where: str) -> LoadedSpec:
    gqa = bool(getattr(module, "ENABLE_GQA", False))
    if hasattr(module, "make"):
        spec = LoadedSpec(Path(where).stem, _flex_builder(module.make), gqa)
    elif isinstance(getattr(module, "cascade", None), Cascade):
        spec = _from_attr(module.cascade, where)
    elif hasattr(module, "score_mod") or hasattr(module, "mask_mod"):
        fns = {k: getattr(module, k, None) for k in _PROGRAMS}
        for key, fn in fns.items():
            if fn is not None and not callable(fn):
                raise SpecLoadError(f"{_assigned_at(module, key, where)}: {key} is "
                                    f"{_describe(fn)}; expected a function or None")
        spec = LoadedSpec(Path(where).stem, _flex_builder(lambda *a: fns), gqa)
    else:
        raise SpecLoadError(f"{where} defines none of make(), score_mod, mask_mod or cascade")
    return spec


def _assigned_at(module: ModuleType, name: str, where: str) -> str:
    """'file:line' of the last top-level assignment to ``name`` in ``module``'s source (the
    line that made it what it is), else ``where``."""
    path = getattr(module, "__file__", None)
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, TypeError, ValueError):
        return where
    lines = [node.lineno for node in tree.body
             if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign))
             for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
             if isinstance(target, ast.Name) and target.id == name]
    return f"{path}:{lines[-1]}" if lines else where


def _from_text(path: Path, name: str | None) -> LoadedSpec:
    from attndsl.frontend.text import parse_file

    specs = parse_file(path)
    if name is None:
        if len(specs) != 1:
            raise SpecLoadError(f"{path} holds {len(specs)} specs ({', '.join(specs)}); name one "
                                f"as {path}:NAME")
        name = next(iter(specs))
    if name not in specs:
        raise SpecLoadError(f"{path} has no spec {name!r}; it has {', '.join(specs)}")
    c = specs[name]
    return LoadedSpec(name, lambda *a, **k: (c, {}), is_flex=False)


def _spec_file(path: Path) -> Path:
    """``path`` if it names a regular file, else a SpecLoadError saying what it is (a
    directory named ``x.attn`` used to fail with IsADirectoryError inside the reader)."""
    if not path.exists():
        raise SpecLoadError(f"{path}: no such file")
    if not path.is_file():
        what = "a directory" if path.is_dir() else "not a regular file"
        raise SpecLoadError(f"{path}: is {what}; expected a {path.suffix} file")
    return path


def load_spec(text: str) -> LoadedSpec:
    """Resolve a SPEC string (see the module docstring)."""
    path_part, _, attr = text.partition(":")
    if len(path_part) == 1 and attr.startswith(("\\", "/")):  # a Windows drive letter
        path_part, _, attr = text[2:].partition(":")
        path_part = text[:2] + path_part
    path = Path(path_part)
    if path.suffix == ".attn":
        return _from_text(_spec_file(path), attr or None)
    if path.suffix == ".py":
        module = import_spec_file(_spec_file(path))
    else:
        try:
            module = importlib.import_module(path_part)
        except ImportError as err:
            raise SpecLoadError(f"{text!r} is neither a .py/.attn file nor an importable "
                                f"module ({err})") from None
    if attr:
        if not hasattr(module, attr):
            raise SpecLoadError(f"{path_part} has no attribute {attr!r}")
        spec = _from_attr(getattr(module, attr), f"{path_part}:{attr}")
        spec.enable_gqa = bool(getattr(module, "ENABLE_GQA", False))
        return spec
    return _from_module(module, path_part)
