import numpy as np
import pytest

import quanta
from quanta import _C

_BEST = _C._set_isa("best")  # honours QUANTA_DISABLE_ISA


def supported_isas():
    """Kernel paths this CPU can run, lowest first."""
    order = ["ref", "avx2", "avx512"]
    hw = _BEST
    return order[: order.index(hw) + 1]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(params=supported_isas())
def isa(request):
    """Runs the test once per kernel path; restores the best path afterwards."""
    got = _C._set_isa(request.param)
    assert got == request.param
    yield request.param
    _C._set_isa("best")


@pytest.fixture
def threads():
    """Restores the thread count after a test changes it."""
    n = quanta.get_num_threads()
    yield
    quanta.set_num_threads(n)
