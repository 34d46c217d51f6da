"""tools/patch_fairseq_imports.py: fairseq's module-level scikit-learn / SciPy imports deferred to first use,
idempotently and with the files' own line endings; the metrics still equal scikit-learn's and SciPy's; the
installed fairseq starts without importing either (make install ran the tool)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "patch_fairseq_imports.py"

# the parts of fairseq 0.12.3's two files the tool edits, as they stand there (CRLF line endings)
SENTENCE_PREDICTION = '''import numpy as np
from sklearn.metrics import f1_score
from sklearn.metrics import matthews_corrcoef as _matthews_corrcoef
from scipy.stats import pearsonr, spearmanr


def simple_accuracy(preds, labels):
    return (preds == labels).mean()


def acc_and_f1(preds, labels):
    acc = simple_accuracy(preds, labels)
    return {"acc": acc, "f1": f1_score(y_true=labels, y_pred=preds)}


def pearson_and_spearman(preds, labels):
    return {"pearson": pearsonr(preds, labels)[0], "spearmanr": spearmanr(preds, labels)[0]}


def matthews_corrcoef(preds, labels):
    return _matthews_corrcoef(labels, preds)
'''.replace("\n", "\r\n")

AUDIO_CLASSIFICATION = '''import numpy as np
from sklearn import metrics as sklearn_metrics


class Task:
    def _inference_with_metrics(self, target_list, lprobs):
        def _compute_eer(target_list, lprobs):
            y_one_hot = np.eye(lprobs.shape[1])[target_list]
            fpr, tpr, thresholds = sklearn_metrics.roc_curve(
                y_one_hot.ravel(), lprobs.ravel()
            )
            return fpr, tpr

        return _compute_eer(target_list, lprobs)
'''.replace("\n", "\r\n")


def _run(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=60)


@pytest.fixture
def fake_fairseq(tmp_path) -> Path:
    root = tmp_path / "fairseq"
    for name, text in (("criterions/sentence_prediction.py", SENTENCE_PREDICTION),
                       ("tasks/audio_classification.py", AUDIO_CLASSIFICATION)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(text.encode())
    return root


def test_imports_are_deferred_once_keeping_crlf_and_the_metrics(fake_fairseq):
    first = _run(fake_fairseq)
    assert first.returncode == 0 and "2 file(s) repaired" in first.stdout, first.stderr
    files = {p: p.read_bytes() for p in fake_fairseq.rglob("*.py")}
    for text in files.values():
        assert b"\r\n" in text and b"\n" not in text.replace(b"\r\n", b"")  # CRLF kept, no bare LF added
        assert not any(line.startswith((b"from sklearn", b"from scipy")) for line in text.splitlines())
    again = _run(fake_fairseq)
    assert again.returncode == 0 and "already repaired" in again.stdout
    assert {p: p.read_bytes() for p in fake_fairseq.rglob("*.py")} == files
    code = f"""
import runpy, sys
import numpy as np
sp = runpy.run_path({str(fake_fairseq / 'criterions' / 'sentence_prediction.py')!r})
ac = runpy.run_path({str(fake_fairseq / 'tasks' / 'audio_classification.py')!r})
assert 'sklearn' not in sys.modules and 'scipy.stats' not in sys.modules, 'imported at module level'
from sklearn.metrics import f1_score, matthews_corrcoef, roc_curve
from scipy.stats import pearsonr, spearmanr
rng = np.random.default_rng(0)
p, l = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
x, y = rng.normal(size=50), rng.normal(size=50)
assert sp['acc_and_f1'](p, l)['f1'] == f1_score(l, p)
assert sp['matthews_corrcoef'](p, l) == matthews_corrcoef(l, p)
r = sp['pearson_and_spearman'](x, y)
assert r['pearson'] == pearsonr(x, y)[0] and r['spearmanr'] == spearmanr(x, y)[0]
t, lp = rng.integers(0, 3, 20), rng.normal(size=(20, 3))
fpr, tpr = ac['Task']()._inference_with_metrics(t, lp)
ref = roc_curve(np.eye(3)[t].ravel(), lp.ravel())
assert np.array_equal(fpr, ref[0]) and np.array_equal(tpr, ref[1])
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_file_that_is_not_fairseqs_changes_nothing_and_is_one_line_exit_2(fake_fairseq):
    other = fake_fairseq / "tasks" / "audio_classification.py"
    other.write_text("import numpy as np\n")
    before = (fake_fairseq / "criterions" / "sentence_prediction.py").read_bytes()
    proc = _run(fake_fairseq)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "audio_classification" in proc.stderr
    assert (fake_fairseq / "criterions" / "sentence_prediction.py").read_bytes() == before  # validated first


@pytest.mark.parametrize("args", [["/no/such/dir"], ["a", "b"]])
def test_a_wrong_argument_is_one_line_exit_2(args):
    proc = _run(*args)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("fairseq") is None, reason="fairseq is not installed (make install)")
def test_installed_fairseq_starts_without_scikit_learn_or_scipy_stats():
    """... and its metrics (called as fairseq calls them, and with keywords) are scikit-learn's and SciPy's."""
    code = """
import sys, fairseq_cli.train
import fairseq.criterions.sentence_prediction as sp
from fairseq.criterions import CRITERION_REGISTRY
from fairseq.tasks import TASK_REGISTRY
assert 'sentence_prediction' in CRITERION_REGISTRY and 'sentence_prediction' in TASK_REGISTRY
print(sorted(m for m in ('sklearn', 'scipy.stats') if m in sys.modules))
import numpy as np
from sklearn.metrics import f1_score, matthews_corrcoef
from scipy.stats import pearsonr, spearmanr
rng = np.random.default_rng(0)
p, l, w = rng.integers(0, 3, 60), rng.integers(0, 3, 60), rng.random(60)
x, y = rng.normal(size=60), rng.normal(size=60)
assert sp.f1_score(y_true=l, y_pred=p, average='macro') == f1_score(l, p, average='macro')
assert sp._matthews_corrcoef(y_true=l, y_pred=p, sample_weight=w) == matthews_corrcoef(l, p, sample_weight=w)
assert tuple(sp.pearsonr(x, y, alternative='less')) == tuple(pearsonr(x, y, alternative='less'))
assert tuple(sp.spearmanr(x, y, nan_policy='omit')) == tuple(spearmanr(x, y, nan_policy='omit'))
assert sp.acc_and_f1(p % 2, l % 2)['f1'] == f1_score(l % 2, p % 2)
assert sp.matthews_corrcoef(p, l) == matthews_corrcoef(l, p)
r = sp.pearson_and_spearman(x, y)
assert r['pearson'] == pearsonr(x, y)[0] and r['spearmanr'] == spearmanr(x, y)[0]
print('metrics equal')
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    out = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and out[-2:] == ["[]", "metrics equal"], proc.stdout[-1000:] + proc.stderr[-2000:]
