"""The user's names of captured tensors, for error messages.

A traced score/mask program's captured tensors have IR names (``cap0``, ``cap1``, ...).  When a
launch refuses a subscript of one (an IndexError, as torch raises), the entry point's decorator
finds the variable the program reads it through (a closure cell or a global, matched by
identity) and names it: ``tensor 'cap1' (bias, captured by score_mod())``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from attndsl.errors import AttnDSLError, SubscriptError
from attndsl.frontend.flex import lower_flex


def _user_names(fns: Iterable[Callable | None], captured: Mapping[str, torch.Tensor]
                ) -> dict[str, str]:
    """IR name -> ``name, captured by fn()`` for tensors a function reaches by a variable (a
    closure cell or a global), found by identity."""
    by_id = {id(t): ir for ir, t in captured.items()}
    out: dict[str, str] = {}
    for fn in fns:
        try:
            cv = inspect.getclosurevars(fn)
        except TypeError:  # not a Python function (a callable object, a builtin)
            continue
        for var, obj in {**cv.globals, **cv.nonlocals}.items():
            if id(obj) in by_id:
                out.setdefault(by_id[id(obj)], f"{var}, captured by {fn.__name__}()")
    return out


def relabelled(err: IndexError, labels: Mapping[str, str]) -> SubscriptError:
    """``err`` (a launch's subscript refusal) with each IR tensor name of ``labels`` followed
    by the user's label (``tensor 'cap1' (bias, captured by score_mod())``)."""
    text = str(err)
    for ir, label in labels.items():
        text = text.replace(f"tensor {ir!r}", f"tensor {ir!r} ({label})")
    return SubscriptError(text)


def user_labels(fns: Iterable[Callable | None], captured: Mapping[str, torch.Tensor]
                ) -> dict[str, str]:
    """IR name -> ``name, captured by fn()`` for the tensors ``fns`` capture (see above)."""
    return _user_names([f for f in fns if f is not None], captured)


def names_captured_tensors(entry: Callable) -> Callable:
    """Decorate a FlexAttention entry point: an IndexError about a captured tensor names it as
    the user does (``tensor 'cap1' (bias, captured by score_mod())``)."""
    @functools.wraps(entry)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return entry(*args, **kwargs)
        except IndexError as err:
            given = inspect.signature(entry).bind(*args, **kwargs).arguments
            score = given.get("score_mod")
            mask = given.get("mask_mod") or getattr(given.get("block_mask"), "mask_mod", None)
            try:  # the entry traced them already: a second trace finds the same tensors
                captured = lower_flex(score, mask).captured
            except AttnDSLError:
                raise err from None
            raise relabelled(err, user_labels((score, mask), captured)) from None
    return run
