"""Attacks on ``fairseq-train --stability-guard``'s gradient norm (the repair ``grad_norm``) and on
``--stability-guard-min-ratio``: bad flag values are one line naming the flag; in real runs, with ``--clip-norm 0``
and with a clipping one, the guard scores the norm fairseq computes and logs (``gnorm``: before clipping)."""

import argparse
import re

import pytest

import fairseq_plugins  # noqa: F401  (installs the repairs)
from fairseq_plugins import guard as fg
from fairseq_plugins.flags import FlagError
from fairseq_helpers import PLUGINS_DIR, TINY_TRANSFORMER_ARGS, run_tool_batch


def _args(**kw):
    """A parsed command line with every guard flag absent, then ``kw``."""
    base = {"stability_guard": False, "stability_monitor": None}
    base.update({"stability_guard_" + n.replace("-", "_"): None for n in fg.OPTIONS})
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("raw", ["1e39", "inf", "-inf", "nan", "0.99", "-1", "true", "", "2,3", "loss=2"])
def test_a_bad_min_ratio_flag_is_refused_naming_it(raw):
    """1e39 (finite, but infinite in float32, where the detector's cut is computed: no value would ever be a
    spike) was accepted before the fix."""
    with pytest.raises(FlagError, match="--stability-guard-min-ratio"):
        fg.check_guard_flags(_args(stability_guard=True, stability_guard_min_ratio=raw))


@pytest.mark.parametrize("raw, expected", [("1", 1.0), ("2.5", 2.5), ("3.4e38", 3.4e38)])
def test_min_ratio_flag_values_accepted(raw, expected):
    args = _args(stability_guard=True, stability_guard_min_ratio=raw)
    fg.check_guard_flags(args)
    assert args.stability_guard_min_ratio == expected


EVENT = re.compile(r"stability guard: update (\d+):.*global gradient norm ([0-9.e+-]+) is")
LOGGED = re.compile(r"num_updates=(\d+),.*gnorm=([0-9.]+)")


@pytest.mark.slow
def test_fairseq_runs_score_fairseqs_pre_clip_norm(tiny_translation_data, tmp_path):
    """Real runs, one process: a guard that flags every rise (threshold 0.01, min ratio 1) prints the gradient
    norm it scored at each event; with ``--clip-norm 0`` and with ``--clip-norm 0.05`` (every update clipped) it is
    fairseq's logged ``gnorm`` of that update (the norm before clipping: the clipped one would be 0.05)."""
    common = [tiny_translation_data.bin, "--user-dir", PLUGINS_DIR, *TINY_TRANSFORMER_ARGS, "--no-save",
              "--save-dir", tmp_path / "ck", "--max-update", "10", "--stability-guard", "--stability-guard-warmup", "4",
              "--stability-guard-window", "8", "--stability-guard-threshold", "0.01",
              "--stability-guard-min-ratio", "1", "--stability-guard-rewind-skip", "0"]
    runs = run_tool_batch("train", [[*common, "--clip-norm", "0"], [*common, "--clip-norm", "0.05"]])
    for run, clip in zip(runs, (0.0, 0.05)):
        assert run.returncode == 0, run.stdout[-3000:]
        logged = {int(u): float(g) for u, g in LOGGED.findall(run.stdout)}
        events = [(int(u), float(v)) for u, v in EVENT.findall(run.stdout)]
        assert len(logged) == 10 and events, run.stdout[-3000:]
        for update, scored in events:  # the guard counts updates from 0, fairseq from 1
            assert scored == pytest.approx(logged[update + 1], rel=2e-3, abs=1e-3)
            assert clip == 0.0 or scored > 10 * clip
