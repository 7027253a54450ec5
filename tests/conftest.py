"""Fixtures shared by several test modules, and how the suite runs on pytest-xdist workers."""
from __future__ import annotations

import os

import pytest

# `make test` runs the suite on pytest-xdist workers, one per core: a worker's torch and OpenMP
# pools get one thread each so two workers do not fight over the same cores (set before torch is
# imported; a value the caller exported wins).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """The suite's CPU-path timings and OpenVINO compiled models go to a temporary cache, not the
    user's ~/.cache/fiber-edge: a test's toy package must not land in it, and a warm cache from an
    earlier run must not make the suite faster than on a fresh machine (CI)."""
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before


def _shares_a_module_fixture(item) -> bool:
    """Whether ``item`` uses a module- or session-scoped fixture defined in its own test module."""
    info = getattr(item, "_fixtureinfo", None)
    defs = info.name2fixturedefs.values() if info else ()
    return any(d and d[-1].scope != "function" and getattr(d[-1].func, "__module__", None) == item.module.__name__
               for d in defs)


def pytest_collection_modifyitems(items):
    """On pytest-xdist workers (``--dist loadfile --no-loadscope-reorder``: a test module is one unit
    of work, handed out in collection order) the long modules go first, so the short ones fill the
    end evenly: modules by their count of `slow` tests, then of tests on a shared module fixture (a
    built package, a converted checkpoint), each module's tests in their own order."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    weight: dict[str, list[int]] = {}
    for item in items:
        w = weight.setdefault(item.module.__name__, [0, 0])
        w[0] += item.get_closest_marker("slow") is not None
        w[1] += _shares_a_module_fixture(item)
    items.sort(key=lambda item: [-n for n in weight[item.module.__name__]])


# Test modules that import modelopt run on one worker: modelopt's import (torch._dynamo, inductor)
# costs ~6 s of CPU in each process that makes it, and these modules need nothing else in common.
SAME_WORKER = {"test_quantize.py": "modelopt", "test_int8_dyhead.py": "modelopt"}


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile``, with the modules of SAME_WORKER handed out as one unit of work."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedImports(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = super()._split_scope(nodeid)
            return SAME_WORKER.get(file.rsplit("/", 1)[-1], file)

    return SharedImports(config, log)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops: one intra-op thread is faster, and far faster on a shared, busy CPU. A module
    opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
