"""Test set-up: CPU runs use Triton's interpreter; hypothesis profiles keep the suite fast."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=8, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.function_scoped_fixture])
settings.register_profile("thorough", max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# every compilation in the suite runs the IR verifiers between passes
os.environ.setdefault("ATTNDSL_VERIFY", "1")


def pytest_addoption(parser) -> None:
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite tests/golden/*.txt from the current compiler output")


@pytest.fixture(autouse=True)
def _seeded_torch() -> None:
    """Every test draws the same random tensors whatever ran before it in its worker (xdist
    orders tests differently run to run): the suite is deterministic."""
    torch.manual_seed(0)
