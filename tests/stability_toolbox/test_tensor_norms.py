"""stability_toolbox.tensor_norms: fused norms, distances and per-row sums of squares against the formulas written
out in float64, for every dtype and layout the monitor meets."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stability_toolbox.tensor_norms import distance_list, norm_list, square_sums, squared_norms


def _exact_norm(t):
    t = t.to_dense() if t.layout != torch.strided else t
    return math.sqrt(float(t.double().pow(2).sum()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_norm_list_is_each_tensors_norm_in_at_least_float32(dtype):
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(5, 3, generator=g).to(dtype), torch.randn(7, generator=g).to(dtype), torch.zeros(0, dtype=dtype)]
    out = norm_list(ts)
    assert [n.dtype for n in out] == [torch.float64 if dtype == torch.float64 else torch.float32] * 3
    for n, t in zip(out, ts):
        assert float(n) == pytest.approx(_exact_norm(t), rel=1e-6)


def test_a_16_bit_norm_past_its_range_is_finite():
    t = torch.full((4,), 60000.0, dtype=torch.float16)  # ||t|| = 120000 > float16's 65504
    assert float(norm_list([t])[0]) == pytest.approx(120000.0)


def test_mixed_dtypes_and_sparse_tensors_keep_their_order():
    i = torch.tensor([[0, 0, 2]])
    sparse = torch.sparse_coo_tensor(i, torch.tensor([1.0, 2.0, 2.0]), (4,), check_invariants=True)  # entry 0 is 3
    ts = [torch.ones(4, dtype=torch.bfloat16), sparse, torch.full((2,), 2.0)]
    assert [float(n) for n in norm_list(ts)] == pytest.approx([2.0, math.sqrt(13.0), math.sqrt(8.0)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_distance_list_is_the_norm_of_the_difference_taken_in_the_tensors_dtype(dtype):
    g = torch.Generator().manual_seed(1)
    now = [torch.randn(6, 4, generator=g).to(dtype), torch.randn(3, generator=g).to(dtype)]
    before = [t + (0.01 * torch.randn(t.shape, generator=g)).to(dtype) for t in now]
    out = distance_list(now, before)
    assert all(d.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) for d in out)
    for d, a, b in zip(out, now, before):
        assert float(d) == pytest.approx(_exact_norm((a - b).double()), rel=1e-5)
    with pytest.raises(ValueError, match="same length"):
        distance_list(now, before[:1])


@settings(max_examples=60, deadline=None)
@given(runs=st.lists(st.tuples(st.sampled_from("abcd"), st.integers(1, 4)), min_size=0, max_size=6))
def test_square_sums_adds_each_rows_squared_norms(runs):
    rows = [r for r, n in runs for _ in range(n)]
    g = torch.Generator().manual_seed(len(rows))
    ts = [torch.randn(3, generator=g) for _ in rows]
    out = square_sums(rows, norm_list(ts) if ts else [])
    expected = {}
    for r, t in zip(rows, ts):  # a row that comes back later (not next to its entries) is added up too
        expected[r] = expected.get(r, 0.0) + float(t.double().pow(2).sum())
    assert set(out) == set(expected)
    for r, v in expected.items():
        assert out[r].dtype == torch.float32 and float(out[r]) == pytest.approx(v, rel=1e-5)


def test_square_sums_checks_its_lengths_and_squared_norms_stacks():
    with pytest.raises(ValueError, match="rows and norms"):
        square_sums(["a"], [])
    sq = squared_norms([torch.tensor([3.0, 4.0]), torch.ones(2, dtype=torch.float64)])
    assert sq.tolist() == pytest.approx([25.0, 2.0])
