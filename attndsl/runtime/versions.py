"""Known incompatibilities between the dependency versions attndsl supports.

The supported range is what CI tests (README, "Tested versions"); combinations inside it that
fail for a reason outside attndsl are detected here and reported in words, instead of as the
dependency's own error deep inside a kernel launch.
"""

from __future__ import annotations

import re
import warnings


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as ``"3.6.0"`` or ``"2.13.0+cpu"``."""
    numbers = re.findall(r"\d+", version)[:2]
    return tuple(int(n) for n in numbers)


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter (CPU runs) cannot work with these versions, or None.

    triton < 3.7's interpreter converts one-element arrays to loop bounds with ``int(array)``,
    which NumPy 2.4 turned from a deprecation into ``TypeError: only 0-dimensional arrays can be
    converted to Python scalars``.  GPU runs do not use the interpreter and are not affected.
    """
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (f"triton {triton_version}'s interpreter (used for CPU tensors) fails with numpy "
                f"{numpy_version}: install numpy<2.4 or triton>=3.7")
    return None


def warn_if_interpreter_broken() -> None:
    """Warn once, at import, when the installed triton and numpy cannot run CPU kernels."""
    import numpy
    import triton

    problem = interpreter_problem(triton.__version__, numpy.__version__)
    if problem is not None:
        warnings.warn(problem, RuntimeWarning, stacklevel=3)
