"""The docs site builds with warnings as errors (what `make docs` runs), and the README stays a front page."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_docs_build_strict(tmp_path):
    mkdocs = Path(sys.executable).parent / "mkdocs"
    if not mkdocs.exists():
        pytest.fail("mkdocs is not installed in this environment (make install installs mkdocs-material)")
    run = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=REPO,
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "WARNING" not in run.stderr, run.stderr[-3000:]
    for page in ("index.html", "api/sign_optim/index.html", "distributed/index.html", "huggingface/index.html"):
        assert (tmp_path / "site" / page).exists(), page
    assert 'id="sign_optim.AddSign"' in (tmp_path / "site" / "api/sign_optim/index.html").read_text()
    # the docstrings' cross-references are links (autorefs), not Sphinx roles printed as text
    admin = (tmp_path / "site" / "api/admin_torch/index.html").read_text()
    assert 'href="#admin_torch.calculate_init"' in admin and ":func:" not in admin
    # formulas are math (arithmatex marks them, KaTeX served by the site renders them offline), never raw
    # LaTeX printed inside a code block
    assert r'class="arithmatex">\(\omega = \sqrt{N}\)' in admin
    assert (tmp_path / "site" / "assets/katex/katex.min.js").exists()
    assert "assets/katex/katex.min.js" in admin and "assets/katex-init.js" in admin
    for page in sorted((tmp_path / "site").rglob("*.html")):
        for block in re.findall(r"<(?:code|pre)[^>]*>(.*?)</(?:code|pre)>", page.read_text(), re.S):
            assert not re.search(r"\\(?:leftarrow|mathrm|sqrt|frac)\b", block), (page.name, block[:200])


def test_readme_is_a_front_page_and_its_links_resolve():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    assert "pip install" in text and "make test" in text
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith("http"):
            assert (REPO / target).exists(), target


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    """The front page's examples are code a user pastes: they must run as written (in a scratch directory:
    they save models)."""
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
