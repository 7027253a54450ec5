"""Fixtures shared by several test modules, and how the suite runs on pytest-xdist workers."""
from __future__ import annotations

import os

import pytest

# `make test` runs the suite on pytest-xdist workers, one per core: a worker's torch and OpenMP
# pools get one thread each so two workers do not fight over the same cores (set before torch is
# imported; a value the caller exported wins).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """``--dist loadgroup``: a test that uses a module- or session-scoped fixture of its own test
    module (a built package, a trained tiny model) runs on the same worker as that module's other
    such tests, so the fixture is built once; every other test is spread one by one."""
    for item in items:
        defs = getattr(item, "_fixtureinfo", None)
        defs = defs.name2fixturedefs.values() if defs else ()
        if any(d[-1].scope != "function" and getattr(d[-1].func, "__module__", "") == item.module.__name__
               for d in defs if d):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops: one intra-op thread is faster, and far faster on a shared, busy CPU. A module
    opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
