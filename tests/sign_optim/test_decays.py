"""The internal decays against their formulas (REFERENCE section 3, TensorFlow's sign_decay), written out here."""

import math
import pickle

import numpy as np
import pytest

from sign_optim import (
    CosineInternalDecay,
    LinearInternalDecay,
    RestartCosineInternalDecay,
    internal_decay_from_state_dict,
    make_internal_decay,
)


def linear_ref(step, T):
    s = np.minimum(step, T)
    return np.maximum(0.0, (T - s) / T)


def cosine_ref(step, T, n=0.5, zero_after=None):
    s = np.minimum(step, T)
    f = 2.0 * n * s / T
    out = 0.5 * (1.0 + np.cos(np.pi * f))
    if zero_after is not None:
        out = np.where(f >= 2.0 * zero_after, 0.0, out)
    return out


def restart_ref(step, T, n=1, zero_after=None):
    s = np.minimum(step, T)
    f = np.mod(n * s, T) / T
    out = 0.5 * (1.0 + np.cos(np.pi * f))
    if zero_after is not None:
        out = np.where(n * s / T >= zero_after, 0.0, out)
    return out


STEPS = np.arange(0, 260)


@pytest.mark.parametrize("decay, step, expected", [
    # hand-computed values, independent of the reference functions above
    (LinearInternalDecay(100), 25, 0.75),
    (LinearInternalDecay(100), 100, 0.0),
    (CosineInternalDecay(100), 50, 0.5),              # half a period: (1 + cos(pi/2)) / 2
    (CosineInternalDecay(100), 100, 0.0),             # the default 0.5 periods end at cos(pi) = -1
    (CosineInternalDecay(100, num_periods=2), 25, 0.0),
    (CosineInternalDecay(100, num_periods=2), 50, 1.0),
    (RestartCosineInternalDecay(100, num_periods=4), 25, 1.0),   # a restart point
    (RestartCosineInternalDecay(100, num_periods=4), 10, 0.6545084971874737),  # (1 + cos(0.4 pi)) / 2
])
def test_hand_computed_anchors(decay, step, expected):
    assert decay(step) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("T", [1, 7, 100, 250])
def test_linear(T):
    decay = LinearInternalDecay(T)
    np.testing.assert_allclose([decay(int(s)) for s in STEPS], linear_ref(STEPS, T), rtol=0, atol=1e-15)
    assert decay(0) == 1.0 and decay(T) == 0.0 and decay(10 * T) == 0.0


@pytest.mark.parametrize("T,n,zero_after", [(100, 0.5, None), (100, 2, None), (37, 1.5, None), (100, 2, 1), (100, 3, 1.5), (1, 0.5, None), (64, 4, 0)])
def test_cosine(T, n, zero_after):
    decay = CosineInternalDecay(T, num_periods=n, zero_after=zero_after)
    np.testing.assert_allclose([decay(int(s)) for s in STEPS], cosine_ref(STEPS, T, n, zero_after), rtol=0, atol=1e-12)


@pytest.mark.parametrize("T,n,zero_after", [(100, 1, None), (100, 4, None), (37, 3, None), (100, 4, 2), (100, 4, 3.5), (100, 2.5, 1), (1, 1, None), (64, 4, 0)])
def test_restart(T, n, zero_after):
    decay = RestartCosineInternalDecay(T, num_periods=n, zero_after=zero_after)
    np.testing.assert_allclose([decay(int(s)) for s in STEPS], restart_ref(STEPS, T, n, zero_after), rtol=0, atol=1e-12)


def test_cosine_defaults_and_zero_after_boundary():
    decay = CosineInternalDecay(100)
    assert (decay(0), decay(50), decay(100), decay(1000)) == (1.0, pytest.approx(0.5), 0.0, 0.0)
    # two periods, zero after the first: f = 4 s / 100 reaches 2 exactly at s = 50
    decay = CosineInternalDecay(100, num_periods=2, zero_after=1)
    assert decay(49) > 0.98 and decay(50) == 0.0 and decay(75) == 0.0
    assert CosineInternalDecay(100, num_periods=2)(50) == pytest.approx(1.0)


def test_restart_zero_after_reaches_zero_and_stays():
    """TF semantics: compare the unwrapped number of periods, not the wrapped fraction (the seed's bug)."""
    decay = RestartCosineInternalDecay(100, num_periods=4, zero_after=2)
    assert decay(24) > 0 and decay(26) > 0.9  # restarted after the first period
    assert all(decay(s) == 0.0 for s in range(50, 300))
    assert 0 < decay(49) < 0.01 and decay(30) > 0.5  # still inside the second period before step 50
    # the seed tested the wrapped fraction ((n s) mod T) / T >= zero_after, which never reaches 1
    wrapped = [(4 * s % 100) / 100 for s in range(300)]
    assert not any(w >= 2 for w in wrapped)


def test_restart_num_periods_restart_points():
    decay = RestartCosineInternalDecay(100, num_periods=4)
    for s in (0, 25, 50, 75):
        assert decay(s) == pytest.approx(1.0)
    assert decay(100) == 1.0  # clipped at T_max, where (n T) mod T = 0


@pytest.mark.parametrize("decay", [LinearInternalDecay(10), CosineInternalDecay(10, 2, 1), RestartCosineInternalDecay(9, 3, None)])
def test_state_dict_round_trip_and_pickle(decay):
    sd = decay.state_dict()
    assert all(isinstance(v, (int, float, str, type(None))) for v in sd.values())
    clone = internal_decay_from_state_dict(sd)
    assert clone == decay and repr(clone) == repr(decay)
    again = pickle.loads(pickle.dumps(decay))
    assert [again(s) for s in range(30)] == [decay(s) for s in range(30)]
    other = type(decay)(3)
    other.load_state_dict(sd)
    assert other == decay


def test_make_internal_decay():
    assert make_internal_decay("none", 10) is None and make_internal_decay(None, 10) is None
    assert make_internal_decay("linear", 10) == LinearInternalDecay(10)
    assert make_internal_decay("cosine", 10) == CosineInternalDecay(10, 0.5)
    assert make_internal_decay("restart", 10, 3, 2) == RestartCosineInternalDecay(10, 3, 2)
    with pytest.raises(ValueError, match="kind must be one of"):
        make_internal_decay("exp", 10)
    with pytest.raises(ValueError, match="zero_after"):
        make_internal_decay("linear", 10, zero_after=1)


@pytest.mark.parametrize(
    "build,exc,match",
    [
        (lambda: LinearInternalDecay(0), ValueError, "T_max"),
        (lambda: CosineInternalDecay(0.5), ValueError, "T_max"),
        (lambda: RestartCosineInternalDecay(-3), ValueError, "T_max"),
        (lambda: LinearInternalDecay("10"), TypeError, "T_max"),
        (lambda: CosineInternalDecay(10, num_periods=0), ValueError, "num_periods"),
        (lambda: RestartCosineInternalDecay(10, num_periods=-1), ValueError, "num_periods"),
        (lambda: CosineInternalDecay(10, zero_after=-1), ValueError, "zero_after"),
        (lambda: CosineInternalDecay(10, num_periods=math.nan), ValueError, "num_periods"),
        (lambda: LinearInternalDecay(10)(-1), ValueError, "step"),
        (lambda: internal_decay_from_state_dict({"kind": "custom"}), ValueError, "kind"),
    ],
)
def test_bad_input(build, exc, match):
    with pytest.raises(exc, match=match):
        build()
