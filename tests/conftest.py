"""Shared fixtures: seeding, the real data sets beside the repo, tiny fairseq data."""

import random
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# property tests: reproducible (derandomized: the same examples on every run), no per-example deadline
settings.register_profile("toolbox", derandomize=True, deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile("toolbox")

# tests/peers.py and tests/fairseq_helpers.py; appended, so that tests/admin_torch etc. never
# shadow the real packages of the same name.
sys.path.append(str(Path(__file__).resolve().parent))

from fairseq_helpers import REPO_ROOT, make_translation_data  # noqa: E402

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seed every generator; one intra-op thread (the tests use tiny tensors, where threads only
    add overhead, and results do not depend on the thread count)."""
    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_dynamo():
    """torch.compile's caches empty before and after the test (compile counts and graphs are the test's own)."""
    import torch

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``<repo>/../shared/data`` (ListOps, Multi30k, MNIST); the test is skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data sets not found at {SHARED_DATA} (they sit beside the repository)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_translation_data(tmp_path_factory):
    """A tiny reversal corpus binarized by the real fairseq-preprocess (shared by the session; read only)."""
    return make_translation_data(tmp_path_factory.mktemp("tiny_translation"))


def pytest_configure(config):
    """``xdist_group`` (pytest-xdist's mark: the tests that share a module's fixture run on one worker under
    ``--dist loadgroup``, as make test runs) is known also where xdist is not loaded (``-p no:xdist``)."""
    config.addinivalue_line("markers", "xdist_group(name): run these tests on one pytest-xdist worker "
                                       "(--dist loadgroup), e.g. the users of one module-scoped fixture")


def pytest_collection_modifyitems(config, items):
    """The files that hold end-to-end (``slow``) tests run first, each file's tests in their order: under
    ``pytest -n`` (make test) the long runs start early and the last minutes are short unit tests, so the workers
    finish together. Tests marked ``cuda`` (the GPU lane, ``make test-gpu``) are skipped without a CUDA device."""
    import torch

    slow_files = {item.nodeid.split("::")[0] for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow_files)  # stable: False (slow files) first
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (the GPU lane: make test-gpu)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
