"""The public packages this toolbox is compared with (:mod:`benchmarks.peers` loads them), for tests.

:func:`require_peer` is :func:`~benchmarks.peers.load_peer` for a compatibility test: it fails the test
(never skips it) when ``make install`` did not put the package under ``<venv>/peers``.

Example::

    >>> admin_0_1_0 = load_peer("admin_torch")   # None where make install did not put it under <venv>/peers
    >>> admin_0_1_0 is None or round(admin_0_1_0.calculate_init(12, "O(logn)"), 3) == 2.017
    True
"""

from types import ModuleType

from benchmarks.peers import PEERS, load_peer, peers_dir  # noqa: F401 (re-exported)


def require_peer(name: str) -> ModuleType:
    """The public package ``name`` (0.1.0); the test FAILS when it is missing: the compatibility claims are
    part of the contract, and a CI machine without the peers must not pass them by skipping."""
    import pytest

    module = load_peer(name)
    if module is None:
        pytest.fail(f"the public package {name} 0.1.0 is not installed under {peers_dir()} (make install puts it "
                    "there): the compatibility tests need it")
    return module

