"""`reinmax.sample_categorical` (`reinmax.sampling`): draws counted against the probabilities with a chi-square
bound at a fixed seed, the inverse-CDF draw written out from the same uniform numbers, generator reproducibility,
the category dim anywhere, and bad input."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from reinmax import sample_categorical
from toolbox_core.validation import data_checks
from torch_helpers import chi_square


def seeded(seed):
    return torch.Generator().manual_seed(seed)


PROBS = torch.tensor([0.05, 0.3, 0.0, 0.15, 0.4, 0.1], dtype=torch.float64)


# ------------------------------------------------------------------ the distribution


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 7.5])  # the weights need not be normalized
def test_frequencies_match_the_probabilities(dtype, scale):
    """40,000 draws of one slice; chi-square over the 5 positive categories (4 degrees of freedom): P(X > 25)
    ~ 5e-5. The category of probability 0 is never drawn."""
    n = 40_000
    weights = (PROBS * scale).to(dtype)
    idx = sample_categorical(weights.expand(n, 6), generator=seeded(0))
    assert idx.shape == (n, 1) and idx.dtype == torch.int64
    counts = torch.bincount(idx[:, 0], minlength=6)
    p = weights.double() / weights.double().sum()  # what the rounded weights ask for
    assert counts[2] == 0
    assert chi_square(counts[p > 0], p[p > 0]) < 25.0


@pytest.mark.parametrize("dim", [0, 1, 2, -1, -3])
def test_frequencies_along_any_dim(dim):
    """Slices along ``dim`` of a (6, 6, 6)-shaped weight tensor, each slice its own distribution: the draws of
    every slice position, pooled over 3,000 repetitions, against that slice's probabilities."""
    gen = seeded(1)
    base = torch.rand(6, 6, 6, generator=gen, dtype=torch.float64) + 0.05
    reps = 3_000
    idx = sample_categorical(base.unsqueeze(0).expand(reps, 6, 6, 6), dim=dim if dim < 0 else dim + 1,
                             generator=gen)
    d = dim % 3
    assert idx.shape == tuple(reps if i == 0 else (1 if i == d + 1 else 6) for i in range(4))
    moved = base.movedim(d, -1)  # (6, 6, categories)
    drawn = idx.squeeze(d + 1)  # (reps, 6, 6): the category drawn at each slice position
    worst = 0.0
    for i in range(6):
        for j in range(6):
            counts = torch.bincount(drawn[:, i, j], minlength=6)
            worst = max(worst, chi_square(counts, moved[i, j] / moved[i, j].sum()))
    assert worst < 40.0  # the largest of 36 chi-squares with 5 dof: P(any > 40) ~ 36 * 1.5e-7


@pytest.mark.parametrize("dim", [0, 1, 2, -2])
def test_dim_picks_the_category_axis(dim):
    """One positive weight per slice along ``dim``, at a position that varies over the slices: the draw is that
    position, whatever the generator (so the output is laid out along ``dim`` correctly)."""
    shape = (4, 5, 3)
    d = dim % 3
    where = torch.randint(shape[d], [s for i, s in enumerate(shape) if i != d], generator=seeded(2))
    probs = torch.nn.functional.one_hot(where, shape[d]).movedim(-1, d).to(torch.float32) * 0.7
    for seed in range(3):
        idx = sample_categorical(probs, dim=dim, generator=seeded(seed))
        assert idx.shape == tuple(1 if i == d else s for i, s in enumerate(shape))
        assert torch.equal(idx.squeeze(d), where)
    # the same on a non-contiguous view with the axes reversed (the other two axes swap places too)
    idx = sample_categorical(probs.transpose(0, 2), dim=2 - d, generator=seeded(0))
    assert torch.equal(idx.squeeze(2 - d), where.T)


def test_draw_is_the_inverse_cdf_of_one_uniform_per_slice():
    """The documented algorithm written out in float64 from the same generator stream: the drawn index is the
    number of cumulative sums <= u * total."""
    weights = torch.rand(500, 7, generator=seeded(3), dtype=torch.float64)
    weights[weights < 0.2] = 0.0
    weights[:, 3] += 0.01  # every slice has a positive entry
    idx = sample_categorical(weights, generator=seeded(4))[:, 0]
    u = torch.rand(500, 1, generator=seeded(4), dtype=torch.float64)
    cdf = weights.cumsum(1)
    expected = (cdf <= u * cdf[:, -1:]).sum(1)
    assert torch.equal(idx, expected)


# ------------------------------------------------------------------ generators


def test_generator_reproduces_the_draws():
    probs = torch.rand(200, 9, generator=seeded(5))
    a, b, c = (sample_categorical(probs, generator=seeded(s)) for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(11)
    first = sample_categorical(probs)  # without a generator: the global one
    torch.manual_seed(11)
    assert torch.equal(sample_categorical(probs), first)


def test_a_generator_is_advanced_by_one_uniform_per_slice():
    probs = torch.rand(10, 4, generator=seeded(6))
    gen = seeded(9)
    sample_categorical(probs, generator=gen)
    ref = seeded(9)
    torch.rand(10, 1, generator=ref)
    assert torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=ref))


# ------------------------------------------------------------------ edges and bad input


def test_no_slices_and_one_category():
    assert sample_categorical(torch.ones(0, 3)).shape == (0, 1)
    assert torch.equal(sample_categorical(torch.full((4, 1), 0.3)), torch.zeros(4, 1, dtype=torch.long))


def test_with_data_checks_off_a_nan_slice_still_gives_a_valid_index():
    with data_checks(False):
        idx = sample_categorical(torch.tensor([[float("nan"), 1.0], [1.0, 0.0]]), generator=seeded(0))
    assert idx[1, 0] == 0 and 0 <= int(idx[0, 0]) <= 1


@pytest.mark.parametrize("args, kwargs, error, match", [
    (("p",), {}, TypeError, "probs must be a floating-point torch.Tensor, got str"),
    ((torch.ones(2, 3, dtype=torch.long),), {}, TypeError,
     "probs must be a floating-point torch.Tensor, got torch.int64"),
    ((torch.ones(2, 3),), dict(dim=2), ValueError, "dim must be an integer >= -2 and <= 1, got 2"),
    ((torch.ones(2, 3),), dict(dim=-3), ValueError, "dim must be an integer >= -2 and <= 1, got -3"),
    ((torch.ones(2, 3),), dict(dim=1.0), TypeError, "dim must be an integer"),
    ((torch.ones(2, 3),), dict(dim=True), TypeError, "dim must be an integer"),
    ((torch.ones(2, 3),), dict(generator=1), TypeError, "generator must be a torch.Generator or None"),
])
def test_bad_arguments_are_named(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        sample_categorical(*args, **kwargs)


@pytest.mark.parametrize("probs", [torch.tensor(1.0), torch.ones(2, 0)])
def test_shape_errors_name_probs(probs):
    with pytest.raises(ValueError, match="^probs must have"):
        sample_categorical(probs)


@pytest.mark.parametrize("probs", [torch.tensor(1.0), torch.ones(2, 0)])
def test_shape_errors_are_value_errors(probs):
    with pytest.raises(ValueError, match="at least one"):
        sample_categorical(probs)


@pytest.mark.parametrize("probs, match", [
    (torch.tensor([[0.5, -0.1, 0.6]]), "probs must be finite and >= 0"),
    (torch.tensor([[0.0, 0.0, 0.0]]), "at least one positive"),
    (torch.tensor([[0.5, float("nan"), 0.5]]), "finite"),
    (torch.tensor([[0.5, float("inf"), 0.5]]), "finite"),
])
def test_sample_categorical_refuses_bad_probabilities(probs, match):
    with pytest.raises(ValueError, match=match):
        sample_categorical(probs)
    with pytest.raises(TypeError, match="floating-point"):
        sample_categorical(torch.tensor([[1, 2]]))


@given(st.lists(st.floats(0, 10), min_size=1, max_size=8).filter(lambda p: sum(p) > 0))
def test_sample_categorical_never_draws_a_zero(p):
    probs = torch.tensor([p] * 64, dtype=torch.float64)
    idx = sample_categorical(probs, generator=torch.Generator().manual_seed(0)).squeeze(-1)
    assert all(p[i] > 0 for i in idx.tolist())


def test_sample_categorical_zero_probability_edges():
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]).repeat(1000, 1)
    idx = sample_categorical(probs, generator=torch.Generator().manual_seed(1)).squeeze(-1)
    assert (idx[0::3] == 1).all() and (idx[1::3] < 2).all() and (idx[2::3] == 2).all()
