r"""ListOps examples and their files: one ``label<TAB>expression`` line per example.

`read_listops` names the file and line of a malformed line; `write_listops` writes to a temporary name, then renames
([`atomic_write`][toolbox_core.files.atomic_write]).

Examples:
    >>> from listops_data.example_files import ListOpsExample
    >>> example = ListOpsExample(9, "( ( ( [MAX 2 ) 9 ) ] )")
    >>> str(example), example.tokens
    ('9\t( ( ( [MAX 2 ) 9 ) ] )', ['[MAX', '2', '9', ']'])
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Union

from toolbox_core import checks
from toolbox_core.files import atomic_write

from .parsing import _ParseError, parse_expression
from .trees import DIGITS, VOCABULARY, evaluate, strip_parentheses

__all__ = ["ListOpsExample", "read_listops", "write_listops"]


@dataclass(frozen=True)
class ListOpsExample:
    """One line of a ListOps file: the label (0-9) and the expression as written (with parentheses)."""

    label: int
    expression: str

    @property
    def tokens(self) -> List[str]:
        """The expression's tokens without parentheses."""
        return strip_parentheses(self.expression.split())

    def __str__(self) -> str:
        return f"{self.label}\t{self.expression}"


def read_listops(path: Union[str, Path], check_labels: bool = False) -> List[ListOpsExample]:
    """Read a ``label<TAB>expression`` file.

    Args:
        path: the file.
        check_labels: also require every label to equal the expression's value.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a malformed line, as ``"<path>:<line>: <what is wrong>"``.
    """
    path = Path(path)
    check_labels = checks.as_bool("check_labels", check_labels)
    examples = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\n").rstrip("\r")
                examples.append(_parse_line(line, check_labels))
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                 f"{e.start + 1}); ListOps files hold ASCII tokens") from None
            except _ParseError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
    return examples


def _parse_line(line: str, check_labels: bool) -> ListOpsExample:
    if line.count("\t") != 1:
        raise _ParseError(f"expected 'label<TAB>expression' (exactly one tab), got {line[:60]!r}")
    label, expression = line.split("\t")
    if label not in DIGITS:
        raise _ParseError(f"label must be one digit 0-9, got {label!r}")
    tokens = expression.split(" ")
    if any(t == "" for t in tokens):
        tokens = expression.split()
        if not tokens:
            raise _ParseError("empty expression")
    unknown = [t for t in tokens if t not in VOCABULARY and t not in ("(", ")")]
    if unknown:
        raise _ParseError(f"unknown token {unknown[0]!r}; accepted: {' '.join(VOCABULARY)} ( )")
    tree = parse_expression(tokens)
    if check_labels and evaluate(tree) != int(label):
        raise _ParseError(f"label {label} but the expression evaluates to {evaluate(tree)}")
    return ListOpsExample(int(label), " ".join(tokens))


def write_listops(path: Union[str, Path], examples: Iterable[ListOpsExample]) -> int:
    """Write examples as ``label<TAB>expression`` lines (to a temporary name, then renamed); returns how many."""
    n = 0
    with atomic_write(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(f"{ex}\n")
            n += 1
    return n
