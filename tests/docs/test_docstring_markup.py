"""The libraries' docstrings and comments are written for the mkdocstrings site (Google style, Markdown): no
Sphinx role (``:func:`x```: an autorefs link ``[`x`][package.x]`` or plain backticks instead) and no reST block
marker (``Example::``, ``.. math::``: a Google ``Examples:`` section, an indented code block). The docs build
fails on the same patterns in a rendered page (tools/mkdocs_hooks.py); this is the fast check over the sources,
every module included, rendered or not."""

import ast
import importlib.util
import io
import re
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_spec = importlib.util.spec_from_file_location("mkdocs_hooks", REPO / "tools" / "mkdocs_hooks.py")
hooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hooks)


def library_packages():
    """The packages the distribution ships (pyproject's ``packages.find`` include list)."""
    text = (REPO / "pyproject.toml").read_text()
    include = re.search(r"\[tool\.setuptools\.packages\.find\][^\[]*?include\s*=\s*\[([^\]]*)\]", text, re.S)
    return sorted({name.strip().strip("\"'").rstrip("*") for name in include.group(1).split(",") if name.strip()})


def raw_markup_in(path: Path):
    """``(line, text)`` of each raw role / reST block marker in the docstrings and comments of ``path``."""
    source = path.read_text()
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for i, line in enumerate(node.value.value.splitlines()):
                found += [(node.lineno + i, hit) for hit in hooks.raw_markup(line)]
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            found += [(tok.start[0], hit) for hit in hooks.raw_markup(tok.string)]
    return found


def test_patterns_catch_sphinx_markup():
    doc = "See :func:`fold` and :class:`~a.b.C`.\n\nExample::\n\n    >>> 1\n\n.. math::\n    x\n"
    assert len(hooks.raw_markup(doc)) == 4
    assert hooks.raw_markup("See [`fold`][admin_torch.fold].\n\nExamples:\n    >>> 1\n") == []
    assert len(hooks.raw_markup("<p>See :func:<code>fold</code>. Example::</p>", html=True)) == 2


def test_no_sphinx_markup_in_library_docstrings():
    packages = library_packages()
    assert {"admin_torch", "reinmax", "sign_optim", "stability_toolbox", "fairseq_plugins"} <= set(packages)
    bad = [f"{path.relative_to(REPO)}:{line}: {hit}"
           for package in packages for path in sorted((REPO / package).rglob("*.py"))
           for line, hit in raw_markup_in(path)]
    assert not bad, "Sphinx/reST markup the docs site prints literally:\n" + "\n".join(bad)


def test_docs_build_runs_the_markup_hook():
    """``make docs`` fails on a page that still shows reST: mkdocs.yml installs the hook."""
    assert re.search(r"(?m)^hooks:\s*\n(\s+- .*\n)*\s+- tools/mkdocs_hooks\.py\s*$", (REPO / "mkdocs.yml").read_text())
