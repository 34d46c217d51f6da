"""End-to-end runs of the recipes' shell stages (prepare -> train -> evaluate) and of the demo,
on a few hundred lines and tiny models, with the real fairseq tools."""

import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fairseq_helpers import BIN_DIR, REPO_ROOT, tool_env

RECIPES = REPO_ROOT / "recipes"
SCRIPTS = ["wmt14/prepare.sh", "wmt14/train.sh", "wmt14/evaluate.sh", "multi30k/prepare.sh",
           "multi30k/train.sh", "multi30k/evaluate.sh", "demo/run.sh", "lm/prepare.sh", "lm/train.sh",
           "lm/evaluate.sh"]
# a 2-layer model and a handful of updates: the recipes' hyper-parameters, shrunk through `--`
TINY = ["--encoder-embed-dim", "32", "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
        "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
        "--warmup-updates", "10", "--log-interval", "5", "--num-workers", "0",
        "--max-epoch", "2", "--keep-last-epochs", "2"]

# an untrained model babbles until max-len: keep decoding short
SHORT_OUTPUT = ["--max-len-a", "1.2", "--max-len-b", "5"]


def run(script: str, *args, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    env = tool_env({"PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"})
    proc = subprocess.run(["bash", str(RECIPES / script), *map(str, args)], cwd=REPO_ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout[-4000:]}")
    return proc


def write_parallel_text(directory: Path, names, tgt: str, sizes=(400, 100, 100), seed: int = 0) -> Path:
    """A made-up language pair: word-by-word translation with a vocabulary map, reversed order."""
    rng = random.Random(seed)
    src_words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7))) for _ in range(80)]
    tgt_words = ["".join(rng.choice("klmnopqrst") for _ in range(rng.randint(2, 7))) for _ in range(80)]
    directory.mkdir(parents=True, exist_ok=True)
    for name, n in zip(names, sizes):
        with open(directory / f"{name}.en", "w") as s, open(directory / f"{name}.{tgt}", "w") as t:
            for _ in range(n):
                ids = [rng.randrange(80) for _ in range(rng.randint(3, 12))]
                s.write(" ".join(src_words[i] for i in ids).capitalize() + ".\n")
                t.write(" ".join(tgt_words[i] for i in reversed(ids)).capitalize() + ".\n")
    return directory


@pytest.fixture(scope="module")
def multi30k_raw(request, tmp_path_factory) -> Path:
    """The real Multi30k files from ../shared when present, generated text with the same names otherwise."""
    try:
        shared = request.getfixturevalue("shared_data")
        if (shared / "multi30k" / "train.en.gz").exists():
            return shared / "multi30k"
    except pytest.skip.Exception:
        pass
    return write_parallel_text(tmp_path_factory.mktemp("m30k_raw"), ("train", "val", "test_2016_flickr"), "de")


def bleu_of(save: Path, split: str = "test") -> float:
    text = (save / f"{split}.bleu").read_text().strip()
    assert re.fullmatch(r"\d+(\.\d+)?", text), text
    return float(text)


def check_bleu(save: Path, reference: Path, split: str = "test") -> None:
    """The recipe's BLEU is sacrebleu's on the decoded hypotheses (no sentencepiece pieces left) against
    the plain reference text, recomputed here with sacrebleu's Python API; a perfect output scores 100."""
    import sacrebleu

    hyps = (save / f"{split}.hyp").read_text().splitlines()
    refs = reference.read_text().splitlines()
    assert len(hyps) == len(refs) and not any("\u2581" in h for h in hyps)
    assert bleu_of(save, split) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=0.051)
    assert sacrebleu.corpus_bleu(refs, [refs]).score == pytest.approx(100.0)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_bad_option(script):
    out = run(script, "--help").stdout
    assert "Usage" in out
    bad = run(script, "--no-such-option", check=False)
    assert bad.returncode != 0 and "unknown option" in bad.stdout


@pytest.mark.parametrize("tokens,max_tokens,workers,expected", [
    (32768, 4096, 8, 1), (32768, 4096, 4, 2), (32768, 4096, 3, 3), (32768, 4096, 1, 8), (4096, 1000, 1, 5)])
def test_update_freq_keeps_the_token_batch(tokens, max_tokens, workers, expected):
    out = subprocess.run(["bash", "-c", f'source "{RECIPES}/lib.sh"; update_freq {tokens} {max_tokens} {workers}'],
                         text=True, capture_output=True, check=True).stdout
    assert int(out) == expected
    # the smallest accumulation that reaches the paper's token batch
    assert expected * max_tokens * workers >= tokens > (expected - 1) * max_tokens * workers


def test_bad_model_and_layers_are_refused(tmp_path):
    for args, message in ([("--model", "nope"), "--model must be one of"], [("--model", "admin", "--layers", "6"), "--layers must look like"]):
        proc = run("multi30k/train.sh", *args, "--data", tmp_path, check=False)
        assert proc.returncode != 0 and message in proc.stdout


@pytest.mark.slow
def test_multi30k_recipe_end_to_end(multi30k_raw, tmp_path):
    out = tmp_path / "m30k"
    run("multi30k/prepare.sh", "--raw", multi30k_raw, "--out", out, "--max-lines", 400, "--vocab", 500)
    assert (out / "bin" / "dict.en.txt").exists() and (out / "spm.model").exists()
    assert sum(1 for _ in open(out / "spm" / "train.en")) <= 400
    save = tmp_path / "ck"
    run("multi30k/train.sh", "--model", "admin", "--layers", "2-2", "--data", out, "--save", save,
        "--gpus", 0, "--max-update", 40, "--max-tokens", 1000, "--tokens-per-update", 1000, "--", *TINY)
    assert (save / "checkpoint_last.pt").exists()
    assert '"train_loss"' in (save / "train.log").read_text()
    proc = run("multi30k/evaluate.sh", "--save", save, "--data", out, "--average", 2, "--", *SHORT_OUTPUT)
    assert "BLEU (test, detokenized sacrebleu)" in proc.stdout
    check_bleu(save, out / "text" / "test.de")
    # the averaged checkpoint is the mean of the last two epochs, parameter by parameter
    from fairseq_plugins import safe_checkpoint

    safe_checkpoint.install()  # allowlists argparse.Namespace for weights_only=True
    states = [torch.load(save / f"checkpoint{e}.pt", weights_only=True, map_location="cpu")["model"] for e in (1, 2)]
    avg = torch.load(save / "averaged.pt", weights_only=True, map_location="cpu")["model"]
    for name, tensor in avg.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, (states[0][name] + states[1][name]) / 2)
    # re-running prepare reuses every step
    assert (save / "test.missing").read_text().strip() == "0"  # every test sentence was translated
    again = run("multi30k/prepare.sh", "--raw", multi30k_raw, "--out", out, "--max-lines", 400)
    assert "normalize" not in again.stdout and "fairseq-preprocess" not in again.stdout


@pytest.mark.slow
@pytest.mark.parametrize("pair,model", [("en-de", "preln"), ("en-fr", "deepnorm")])
def test_wmt14_recipe_end_to_end_on_local_files(tmp_path, pair, model):
    tgt = pair.split("-")[1]
    raw = write_parallel_text(tmp_path / "raw", ("train", "valid", "test"), tgt, seed=1)
    out = tmp_path / "wmt"
    run("wmt14/prepare.sh", "--pair", pair, "--raw", raw, "--out", out, "--max-lines", 300, "--vocab", 300)
    assert (out / "bin" / f"dict.{tgt}.txt").exists()
    save = tmp_path / "ck"
    proc = run("wmt14/train.sh", "--pair", pair, "--model", model, "--layers", "2-1", "--data", out, "--save", save,
               "--gpus", 0, "--max-update", 20, "--max-tokens", 500, "--tokens-per-update", 1000, "--", *TINY)
    assert "update-freq 2" in proc.stdout  # 1000 tokens per update from 500-token batches on one CPU worker
    assert (save / "checkpoint_last.pt").exists()
    run("wmt14/evaluate.sh", "--pair", pair, "--save", save, "--data", out, "--average", 1, "--split", "valid", "--", *SHORT_OUTPUT)
    check_bleu(save, out / "text" / f"valid.{tgt}", "valid")


@pytest.mark.slow
def test_demo_quick_shows_the_claim_and_reuses_runs(tmp_path):
    """The demo's claim at --quick scale: deep Post-LN stays on its plateau while Admin (and Pre-LN) learn.

    Measured on the 2-core CPU machine (12L-12L, d=32, lr 2e-3, 150 updates, seed 1): Post-LN 6.234 bits,
    Admin 5.943, Pre-LN 5.973; the margin asserted (0.15 bits) is half the gap. A plain Post-LN `transformer`
    behind the `admin` label, or an omega of 1, would fail it."""
    out = tmp_path / "demo"
    proc = run("demo/run.sh", "--quick", "--out", out)
    assert "Post-LN" in proc.stdout and "Admin" in proc.stdout and "Pre-LN" in proc.stdout
    png = re.search(r"training curves: (\S+\.png)", proc.stdout).group(1)
    assert Path(png).stat().st_size > 1000
    assert re.search(r"postln\s+update\s+150/150", proc.stdout)  # progress is shown
    rows = {r["model"]: r for r in json.loads((Path(png).parent / "results.json").read_text())["rows"]}
    assert rows["postln"]["updates"] == rows["admin"]["updates"] == 150
    assert rows["postln"]["status"] == "stalled"
    assert rows["admin"]["final_loss"] < rows["postln"]["final_loss"] - 0.15, rows
    assert rows["preln"]["final_loss"] < rows["postln"]["final_loss"] - 0.15, rows
    again = run("demo/run.sh", "--quick", "--out", out)
    assert again.stdout.count("reuse finished run") == 3 and "reuse data" in again.stdout


@pytest.fixture(scope="module")
def lm_prepared(shared_data, tmp_path_factory) -> Path:
    """lm/prepare.sh's output on the real text (the same for every model: prepared once, read only)."""
    out = tmp_path_factory.mktemp("lm_prepared") / "lm"
    run("lm/prepare.sh", "--raw", shared_data / "multi30k", "--lang", "en", "--out", out, "--max-lines", 300,
        "--vocab", 200)
    return out


@pytest.mark.slow
@pytest.mark.xdist_group("lm_recipe")  # both models on one worker under `pytest --dist loadgroup`: one prepare
@pytest.mark.parametrize("model", ["admin", "preln"])
def test_lm_recipe_end_to_end_on_real_text(lm_prepared, tmp_path, model):
    """prepare (sentencepiece, --only-source) -> train a tiny LM -> fairseq-eval-lm perplexity."""
    out = tmp_path / "lm"
    shutil.copytree(lm_prepared, out)  # the prepared data, where this model's run writes
    save = out / "ck"
    run("lm/train.sh", "--model", model, "--layers", 2, "--dim", 32, "--data", out, "--save", save, "--gpus", 0,
        "--max-update", 6, "--warmup", 2, "--max-tokens", 512, "--tokens-per-update", 512)
    ppl = run("lm/evaluate.sh", "--save", save, "--data", out, "--split", "valid").stdout
    match = re.search(r"Perplexity: ([\d.]+)", ppl)
    assert match and 1 < float(match.group(1)) < 400, ppl[-2000:]
    assert (save / "valid.ppl").read_text().startswith("Loss (base 2):")


# ---------------------------------------------------------------- the ListOps evaluator at the edges (issue 21)

def listops_evaluator():
    import importlib.util
    spec = importlib.util.spec_from_file_location("listops_evaluate", RECIPES / "listops" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class LengthModel(torch.nn.Module):
    """Predicts (unpadded length) % 10: the recipe's batching is checked against each example alone."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, src, lengths):
        self.calls += 1
        return torch.nn.functional.one_hot(lengths % 10, 10).float()


@pytest.mark.parametrize("max_tokens", [1, 7, 4000])
def test_listops_evaluate_batches_match_single_examples(max_tokens):
    from fairseq_plugins.tasks.listops import listops_dictionary
    from listops_data import generate

    examples = generate(30, seed=max_tokens, max_length=40)
    preds = listops_evaluator().evaluate(LengthModel(), listops_dictionary(), examples, max_tokens=max_tokens)
    assert preds == [len(ex.tokens) % 10 for ex in examples]


@pytest.mark.parametrize("expression", ["( [MAX ] )", "[MAX ]", "( ( ( [SM 1 ) ( [MIN ] ) ) ] )", "( ( [SM 1 ) ]"])
def test_listops_evaluate_refuses_an_operator_without_argument(expression):
    from fairseq_plugins.tasks.listops import listops_dictionary
    from listops_data import ListOpsExample, generate

    examples = generate(3, seed=0, max_length=20) + [ListOpsExample(0, expression)]
    model = LengthModel()
    with pytest.raises(ValueError, match=rf"examples\[3\]: expression {re.escape(repr(expression))} is not well-formed"):
        listops_evaluator().evaluate(model, listops_dictionary(), examples)
    assert model.calls == 0  # refused before the model ran


@pytest.mark.parametrize("max_tokens, exc", [(0, ValueError), (-5, ValueError), (2.5, TypeError)])
def test_listops_evaluate_refuses_bad_max_tokens(max_tokens, exc):
    from fairseq_plugins.tasks.listops import listops_dictionary
    from listops_data import generate

    with pytest.raises(exc, match="max_tokens"):
        listops_evaluator().evaluate(LengthModel(), listops_dictionary(), generate(2, max_length=10), max_tokens=max_tokens)
