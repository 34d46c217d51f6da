"""sign_optim.aliasing.first_overlap against the element sets written out: two tensors overlap exactly when they
have a storage element in common and at least one is written."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sign_optim import aliasing, fused


@pytest.fixture(params=["native", "python"], scope="module")
def first_overlap(request):
    """Both implementations: the native check (where the extension is built) and the Python fallback."""
    if request.param == "native":
        if not fused.available("cpu"):
            pytest.skip(fused.unavailable_reason("cpu"))
        return aliasing.first_overlap
    return lambda *lists: aliasing._first_overlap_python([list(ts) for ts in lists])


def elements(t: torch.Tensor) -> set:
    """The storage addresses of every element of ``t``, enumerated one by one (the independent reference)."""
    base, size = t.data_ptr(), t.element_size()
    out = set()
    for index in torch.cartesian_prod(*[torch.arange(n) for n in t.shape]).reshape(-1, t.dim()).tolist() \
            if t.dim() > 1 else [[i] for i in range(t.numel())]:
        out.add(base + size * sum(i * s for i, s in zip(index, t.stride())))
    return out


@settings(max_examples=40, deadline=None)
@given(start_a=st.integers(0, 20), start_b=st.integers(0, 20), rows=st.integers(1, 4), step_a=st.integers(1, 3),
       step_b=st.integers(1, 3), transpose=st.booleans(), written_b=st.booleans())
def test_views_of_one_storage_overlap_exactly_when_they_share_an_element(first_overlap, start_a, start_b, rows,
                                                                         step_a, step_b, transpose, written_b):
    storage = torch.zeros(64)
    a = storage[start_a:start_a + 2 * rows * step_a:step_a].view(rows, 2)
    b = storage[start_b:start_b + 2 * rows * step_b:step_b].view(rows, 2)
    if transpose:
        b = b.t()
    want = bool(elements(a) & elements(b))
    found = first_overlap([a], [], [b] if written_b else [], []) if written_b else first_overlap([a], [b], [], [])
    assert (found is not None) == want
    if want:
        assert {found[0], found[1]} == {("params", 0), ("exp_avgs" if written_b else "grads", 0)}


def test_read_only_tensors_may_share_memory(first_overlap):
    g = torch.randn(5)
    assert first_overlap([torch.randn(5), torch.randn(5)], [g, g], [], []) is None


@pytest.mark.parametrize("case", ["same tensor twice", "partial", "adjacent"])
def test_written_tensors_among_themselves(first_overlap, case):
    base = torch.randn(10)
    tensors = {"same tensor twice": [base, base], "partial": [base[:6], base[4:]], "adjacent": [base[:5], base[5:]]}
    found = first_overlap(tensors[case], [], [], [])
    assert found == (None if case == "adjacent" else (("params", 1), ("params", 0)))


def test_empty_and_meta_tensors_take_no_part(first_overlap):
    assert first_overlap([torch.empty(0), torch.empty(0), torch.zeros(3, device="meta")] * 2, [], [], []) is None
