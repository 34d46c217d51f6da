"""mkdocs hooks of the docs site (``hooks:`` in mkdocs.yml): a page that shows reStructuredText fails the build.

The API pages render the libraries' docstrings with mkdocstrings (Google style, Markdown). Cross-references
are mkdocs-autorefs links, ``[`fold`][admin_torch.fold]`` (the strict build fails on one that does not
resolve); examples are Google ``Examples:`` sections of doctest lines. A Sphinx role (``:func:`fold```) or a
reST block marker (``Example::``, ``.. math::``) would be printed literally, so any left in a rendered page
is a warning naming the page and the text, which fails the strict build (``make docs``). tests/docs/test_docstring_markup.py runs the same patterns over the
sources without building the site.
"""

import logging
import re
from html import unescape
from typing import List

#: a Sphinx role as written in a docstring: ``:func:`x```, ``:py:class:`x```, ``:math:`x```
ROLE = re.compile(r"(?<![\w`]):(?:py:)?(?:func|class|mod|meth|data|attr|exc|obj|const|math|ref|doc|term):`")
#: reST block markers that Markdown prints as they are
REST_BLOCK = re.compile(r"(?m)(?:\bExamples?::\s*$|^\s*\.\. [a-z-]+::)")
#: the block markers as they show in a rendered page
_BLOCK_ANYWHERE = re.compile(r"\bExamples?::|\.\. [a-z-]+::")


def raw_markup(text: str, html: bool = False) -> List[str]:
    """The raw reST roles and block markers in ``text`` (docstring source, or a rendered page with ``html``),
    each with the text that follows it."""
    if html:  # back to text: ``:func:<code>x</code>`` reads ``:func:`x```
        text = unescape(re.sub(r"<[^>]+>", "", re.sub(r"</?code>", "`", text)))
    found = []
    for pattern in (ROLE, _BLOCK_ANYWHERE if html else REST_BLOCK):
        for m in pattern.finditer(text):
            found.append(" ".join(text[m.start():m.end() + 40].split()))
    return found


log = logging.getLogger("mkdocs.hooks.raw_markup")  # a warning: the strict build (make docs) fails on it


def on_page_content(html: str, page, config, files) -> str:
    found = raw_markup(html, html=True)
    if found:
        log.warning(f"{page.file.src_uri}: reStructuredText printed literally (use autorefs links "
                    f"[`name`][package.name] and Google 'Examples:' sections), {len(found)} in all: "
                    + "; ".join(found[:10]))
    return html
