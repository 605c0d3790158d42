"""Test set-up shared by every test file.

- TRITON_INTERPRET=1 is set before anything imports triton, so the "triton" backend runs on CPU
  tensors through the Triton interpreter. (The AOT compile tests run in a subprocess without it.)
- `poison_allocations` (autouse) makes every torch.empty/empty_like/new_empty return NaN-filled
  floats and sentinel-filled integers, so an output element a kernel never writes fails the test.
  It first drops the chunk loops' kept CPU scratch (mmfast/backends/chunked.scratch), so each test's
  first loop gets a poisoned one too.
- Under pytest-xdist (`make test` runs one worker per core), each worker's torch gets its share of the
  cores, so two workers do not fight over the same ones; `test_threads.py` checks the C++ kernels at
  several thread counts against one thread. The embedded default (MMFAST_HOME) is built once for all
  workers: the controller picks the folder before it starts them, and the builder is safe to race.
- `seeded_global_rng` (autouse) seeds torch's, numpy's and Python's global generators from the test's
  id before each test: a test that draws from them gets the same numbers whichever worker runs it,
  after whichever tests (under `--dist worksteal` the order changes from run to run).
"""

import atexit
import os
import random
import shutil
import tempfile
import zlib

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

INT_POISON = -(2**62)


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype in (torch.int64, torch.int32):
        t.fill_(INT_POISON if t.dtype == torch.int64 else -(2**30))
    return t


@pytest.fixture(autouse=True)
def seeded_global_rng(request):
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy
    except ImportError:  # numpy is optional for torch
        return
    numpy.random.seed(seed)


@pytest.fixture(autouse=True)
def poison_allocations(monkeypatch, request):
    if request.node.get_closest_marker("no_poison"):
        yield
        return
    from mmfast.backends.chunked import release_scratch

    release_scratch()
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: _poison(new_empty(self, *a, **k)))
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "no_poison: do not NaN-fill fresh allocations in this test")
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:  # in a worker
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))
    elif "MMFAST_HOME" not in os.environ:  # in the controller, or a run without workers
        os.environ["MMFAST_HOME"] = tempfile.mkdtemp(prefix="mmfast-test-home-")
        atexit.register(shutil.rmtree, os.environ["MMFAST_HOME"], True)


@pytest.fixture
def backend(request, monkeypatch):
    """A backend as the tests parametrise it (indirect=True): "triton+<path>" is the triton backend
    with MMFAST_CONTRASTIVE_PATH forcing <path> (kernels/contrastive_loss.py PATH_CHOICES)."""
    base, _, path = request.param.partition("+")
    if path:
        monkeypatch.setenv("MMFAST_CONTRASTIVE_PATH", path)
    return base
