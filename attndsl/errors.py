"""The base of every error attndsl raises for a bad spec or bad arguments.

Each user-facing error class derives from :class:`AttnDSLError` *and* from the built-in class
it always had (``SpecError`` and ``IRError`` are ``ValueError`` s, ``TraceError`` is a
``TypeError``), so ``except attndsl.AttnDSLError`` catches every problem a spec or a call can
have while older ``except ValueError`` code keeps working.  Anything else escaping attndsl
(``KeyError``, ``AttributeError``, ...) is a bug of attndsl, never of the spec.

The hierarchy (module of each class in brackets)::

    AttnDSLError
      SpecError (frontend.text)          .attn text / builder: file:line:col and a caret
      TraceError (frontend.trace)        score_mod / mask_mod: function, file and line
      SpecLoadError (frontend.load)      a CLI SPEC that names nothing loadable
      IRError (ir.expr)                  an ill-formed cascade (LoweringError, NotStreamable,
                                         GradError: one the kernel template cannot take)
      EagerError (eager; ir.evaluate's EvaluationError), MaskAnalysisError (passes.mask),
      CodegenError (codegen)
      AttentionError (api)               bad arguments to flex_attention / a compiled kernel
      SubscriptError (errors)            a subscript out of range (an IndexError, as torch's)
      ModuleWriteError (runtime.modules) a module path that is a directory or not writable
                                         (an OSError)

This module imports nothing of attndsl, so every layer can use it.
"""

from __future__ import annotations


class AttnDSLError(Exception):
    """A problem with a spec or with the arguments of a call; the message says what was
    expected and where (``file:line:col`` for .attn text and builder calls, the function and
    its line for score_mod / mask_mod programs)."""


class SubscriptError(AttnDSLError, IndexError):
    """A subscript of a tensor read by a spec is out of range (torch raises IndexError there
    too): the message names the tensor, the dimension, the range of values and the size.
    Generated standalone modules raise a plain IndexError with the same message."""


def located_message(what: str, file: str, line: int, col: int, source_line: str = "") -> str:
    """``file:line:col: error: what``, then the source line and a caret under column ``col``.

    Tabs before the column are kept so that the caret lines up under the same character in a
    terminal.  The message always has these three lines (the second is empty when the text is
    unknown, as at the end of a file)."""
    head = f"{file}:{line}:{col}: error: {what}"
    pad = "".join(ch if ch == "\t" else " " for ch in source_line[: col - 1])
    caret = pad + " " * (col - 1 - len(pad)) + "^"
    return f"{head}\n  {source_line}\n  {caret}"


__all__ = ["AttnDSLError", "SubscriptError", "located_message"]
