"""Known dependency incompatibilities are reported in words (attndsl.runtime.versions)."""

import pytest

from attndsl.runtime.versions import interpreter_problem


@pytest.mark.parametrize("triton_version", ["3.6.0", "3.5.1", "3.6.0+git1234"])
@pytest.mark.parametrize("numpy_version", ["2.4.0", "2.4.6", "3.0.0"])
def test_old_triton_interpreter_with_numpy_2_4_is_reported(triton_version: str,
                                                           numpy_version: str) -> None:
    problem = interpreter_problem(triton_version, numpy_version)
    assert problem is not None
    assert triton_version in problem and numpy_version in problem
    assert "numpy<2.4" in problem and "triton>=3.7" in problem


@pytest.mark.parametrize(("triton_version", "numpy_version"),
                         [("3.6.0", "2.3.5"), ("3.6.0", "1.26.4"), ("3.8.0", "2.4.6"),
                          ("3.9.0", "2.4.6"), ("3.10.0", "2.5.0")])
def test_working_combinations_are_not_reported(triton_version: str, numpy_version: str) -> None:
    assert interpreter_problem(triton_version, numpy_version) is None
