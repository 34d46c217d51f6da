"""Task ``listops``, model ``listops_tree``, criterion ``listops_cross_entropy``: in-process and real fairseq-train."""

import json
import subprocess
import sys

import pytest
import torch

from fairseq_helpers import PLUGINS_DIR, REPO_ROOT, run_tool, tool_env
from listops_data import generate, write_listops

LISTOPS_ARGS = [
    "--user-dir", PLUGINS_DIR, "--task", "listops", "--arch", "listops_tree",
    "--criterion", "listops_cross_entropy", "--embed-dim", "16", "--hidden-dim", "16", "--mlp-dim", "16",
    "--optimizer", "adam", "--lr", "1e-3", "--clip-norm", "5", "--batch-size", "16",
    "--cpu", "--seed", "1", "--no-progress-bar", "--log-interval", "1", "--log-format", "simple",
    "--num-workers", "0",
]


@pytest.fixture(scope="module")
def listops_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("listops")
    write_listops(root / "train.tsv", generate(120, seed=1, max_length=25))
    write_listops(root / "valid.tsv", generate(40, seed=2, max_length=25))
    write_listops(root / "test.tsv", generate(40, seed=3, max_length=60))
    return root


@pytest.fixture(scope="module")
def task_module():
    pytest.importorskip("fairseq")
    import fairseq_plugins  # noqa: F401
    from fairseq_plugins.tasks import listops
    return listops


def make_task(task_module, data, **overrides):
    cfg = task_module.ListOpsConfig(data=str(data), **overrides)
    return task_module.ListOpsTask.setup_task(cfg)


def test_dataset_batches_are_padded_with_lengths(task_module, listops_dir):
    task = make_task(task_module, listops_dir, max_train_length=10)
    train = task.load_dataset("train")
    assert max(train.sizes) <= 10  # the training split is filtered
    valid = task.load_dataset("valid")
    assert max(valid.sizes) > 10   # other splits are not
    batch = valid.collater([valid[i] for i in range(5)])
    src, lengths = batch["net_input"]["src_tokens"], batch["net_input"]["src_lengths"]
    assert src.shape == (5, int(lengths.max())) and batch["target"].shape == (5,)
    pad = task.source_dictionary.pad()
    for row, n in zip(src, lengths.tolist()):
        assert (row[n:] == pad).all() and (row[:n] != pad).all()
    assert all(task.source_dictionary[i] not in ("(", ")") for i in src.flatten().tolist())


def test_malformed_line_names_file_and_line(task_module, tmp_path):
    (tmp_path / "train.tsv").write_text("0\t( ( ( [SM 1 ) 9 ) ] )\n1\t( ( ( [SM 1 ) 9 ) ] ) )\n")
    task = make_task(task_module, tmp_path)
    with pytest.raises(ValueError, match=r"train\.tsv:2: unexpected token"):
        task.load_dataset("train")
    with pytest.raises(FileNotFoundError, match="valid"):
        task.load_dataset("valid")
    with pytest.raises(ValueError, match="data must be a directory"):
        make_task(task_module, tmp_path / "missing")


def test_model_and_criterion_in_process(task_module, listops_dir):
    from fairseq_plugins.models.listops_tree import ListOpsTreeConfig, ListOpsTreeModel
    task = make_task(task_module, listops_dir)
    valid = task.load_dataset("valid")
    model = ListOpsTreeModel.build_model(ListOpsTreeConfig(embed_dim=8, hidden_dim=8, mlp_dim=8,
                                                           estimator="gumbel_rao", gumbel_rao_k=3), task)
    assert model.classifier.encoder.estimator_options == {"k": 3}
    crit = task_module.ListOpsCrossEntropy(task_module.ListOpsCriterionConfig(), task)
    sample = valid.collater([valid[i] for i in range(8)])
    loss, n, log = crit(model, sample)
    loss.backward()
    assert n == 8 and torch.isfinite(loss) and 0 <= log["ncorrect"] <= 8


@pytest.mark.slow
def test_fairseq_train_then_evaluate(listops_dir, tmp_path):
    save = tmp_path / "ck"
    out = run_tool("train", listops_dir, *LISTOPS_ARGS, "--estimator", "reinmax", "--tau", "1.1",
                   "--max-update", "12", "--save-dir", save, "--max-train-length", "20").stdout
    assert "accuracy" in out and "done training" in out
    assert (save / "checkpoint_last.pt").exists()
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "recipes" / "listops" / "evaluate.py"),
                           "--checkpoint", str(save / "checkpoint_last.pt"), "--test", str(listops_dir / "test.tsv"),
                           "--json", str(tmp_path / "acc.json")],
                          env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    result = json.loads((tmp_path / "acc.json").read_text())
    # the recipe's batched, padded evaluation against one example at a time, unpadded, in this process
    import torch
    from fairseq import checkpoint_utils
    from listops_data import read_listops

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(save / "checkpoint_last.pt")],
                                                                   arg_overrides={"data": str(listops_dir)})
    model = models[0].eval()
    examples = read_listops(listops_dir / "test.tsv")
    correct = 0
    with torch.no_grad():
        for ex in examples:
            tokens = torch.tensor([[task.source_dictionary.index(t) for t in ex.tokens]])
            correct += int(model(tokens, torch.tensor([tokens.shape[1]])).argmax(-1).item() == ex.label)
    assert result["examples"] == len(examples) == 40
    assert result["accuracy"] == pytest.approx(100.0 * correct / len(examples))
