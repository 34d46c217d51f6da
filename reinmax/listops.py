"""ListOps (Nangia & Bowman 2018): generator, evaluator, parser and file reader.

A ListOps expression is a tree of list operators over the digits 0-9:

* ``[MIN``, ``[MAX``: minimum / maximum of the arguments,
* ``[MED``: integer median (the mean of the two middle values rounded down on an even count,
  which is what the official ``int(numpy.median(...))`` gives for non-negative values),
* ``[SM``: sum modulo 10,

each closed by ``]``. Files hold one example per line, ``label<TAB>expression``, with every node
written left-nested in binary parentheses, e.g. ``[SM 6 5 9 0 ]`` is written
``( ( ( ( ( [SM 6 ) 5 ) 9 ) 0 ) ] )`` and its label is ``0``.

The generator follows the official ``make_data.py`` of nyu-mll/spinn (listops-release):
below the depth cap each node is an operator with probability ``operator_prob`` = 0.25 (the
official ``VALUE_P = 0.25`` is compared as ``r > VALUE_P -> value``, so *values* have probability
0.75; the official test set confirms this: 25.2% of the arguments are operators), an operator
takes 2 to 5 arguments, a node at depth ``max_depth`` = 20 is forced to be a value (the root has
depth 1), and the trees of a data set are unique. It draws from :class:`random.Random` in the
same order as the official script.

Lengths count the tokens without parentheses (what a latent-tree model reads), e.g. the example
above has length 6.

Example::

    >>> from reinmax.listops import generate, to_string, evaluate, parse_expression
    >>> examples = generate(3, seed=0, max_length=30)
    >>> label, expression = examples[0].label, examples[0].expression
    >>> evaluate(parse_expression(expression.split())) == label
    True
"""

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

__all__ = [
    "OPERATORS", "END", "VOCABULARY", "Tree", "ListOpsExample",
    "generate", "generate_tree", "iter_generate", "to_string", "to_tokens", "evaluate",
    "parse_expression", "tree_depth", "tree_length", "read_listops", "write_listops",
    "strip_parentheses",
]

OPERATORS: Tuple[str, ...] = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
DIGITS: Tuple[str, ...] = tuple(str(d) for d in range(10))
#: The tokens a model sees (parentheses removed): digits, operators, ``]``.
VOCABULARY: Tuple[str, ...] = DIGITS + OPERATORS + (END,)

# A tree is a digit (int) or (operator, (argument trees...)); tuples make it hashable for uniqueness.
Tree = Union[int, Tuple[str, Tuple["Tree", ...]]]


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


# ----------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------

def generate_tree(rng: random.Random, depth: int = 1, max_depth: int = 20, max_args: int = 5,
                  operator_prob: float = 0.25) -> Tree:
    """Draw one tree as the official generator does (same order of calls to ``rng``).

    ``depth`` is the depth of the node being drawn (the root has depth 1); at ``depth >= max_depth``
    the node is a value.
    """
    r = rng.random() if depth < max_depth else 1.0
    if r > operator_prob:
        return rng.choice(range(10))
    num_args = rng.randint(2, max_args)
    args = tuple(generate_tree(rng, depth + 1, max_depth, max_args, operator_prob) for _ in range(num_args))
    return (rng.choice(OPERATORS), args)


def tree_length(tree: Tree) -> int:
    """Number of tokens without parentheses (operator, arguments and ``]`` of every node)."""
    if isinstance(tree, int):
        return 1
    return 2 + sum(tree_length(a) for a in tree[1])


def tree_depth(tree: Tree) -> int:
    """Depth of the tree: 1 for a bare digit, 1 + the deepest argument for an operator."""
    if isinstance(tree, int):
        return 1
    return 1 + max(tree_depth(a) for a in tree[1])


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def iter_generate(seed: int = 0, *, max_depth: int = 20, max_args: int = 5, operator_prob: float = 0.25,
                  min_length: int = 1, max_length: Optional[int] = None,
                  min_depth: int = 1, allow_value_root: bool = False,
                  exclude: Iterable[str] = ()) -> Iterator[ListOpsExample]:
    """Yield unique ListOps examples forever (see :func:`generate`)."""
    _check_int("max_depth", max_depth, 1)
    _check_int("max_args", max_args, 2)
    _check_int("min_length", min_length, 1)
    _check_int("min_depth", min_depth, 1)
    if max_length is not None:
        _check_int("max_length", max_length, min_length)
    if not isinstance(operator_prob, (int, float)) or not 0.0 < operator_prob < 1.0:
        raise ValueError(f"operator_prob must be a float in (0, 1), got {operator_prob!r}")
    if min_depth > max_depth:
        raise ValueError(f"min_depth ({min_depth}) must be <= max_depth ({max_depth})")
    rng = random.Random(seed)
    seen = set(exclude)
    while True:
        tree = generate_tree(rng, 1, max_depth, max_args, operator_prob)
        if isinstance(tree, int) and not allow_value_root:
            continue
        length = tree_length(tree)
        if length < min_length or (max_length is not None and length > max_length):
            continue
        if tree_depth(tree) < min_depth:
            continue
        expression = to_string(tree)
        if expression in seen:
            continue
        seen.add(expression)
        yield ListOpsExample(evaluate(tree), expression)


def generate(num_examples: int, seed: int = 0, *, max_depth: int = 20, max_args: int = 5,
             operator_prob: float = 0.25, min_length: int = 1, max_length: Optional[int] = None,
             min_depth: int = 1, allow_value_root: bool = False, exclude: Iterable[str] = (),
             progress: bool = False) -> List[ListOpsExample]:
    """Generate ``num_examples`` unique ListOps examples from the official distribution.

    Args:
        num_examples: how many examples.
        seed: seed of the :class:`random.Random` that draws the trees.
        max_depth: depth cap (official 20); nodes at this depth are values.
        max_args: most arguments of an operator (official 5; the fewest is 2).
        operator_prob: probability that a node below the cap is an operator (official 0.25).
        min_length, max_length: keep trees whose length (tokens without parentheses) is in range.
        min_depth: keep trees at least this deep (1 keeps bare digits when ``allow_value_root``).
        allow_value_root: keep bare-digit expressions (the official process draws them 75% of the
            time, but only 10 distinct ones exist; the official test set holds one, ``9<TAB>9``).
        exclude: expressions (as written, with parentheses) never to produce, e.g. a test set's.
        progress: print a progress line to stderr every 10% of the way.

    Returns:
        A list of :class:`ListOpsExample`, in the order drawn.
    """
    _check_int("num_examples", num_examples, 0)
    out: List[ListOpsExample] = []
    if num_examples == 0:
        return out
    if max_length is not None and min_length <= max_length < 3 and not allow_value_root:
        raise ValueError(f"max_length must be >= 4 when allow_value_root is False (an operator with two "
                         f"arguments has 4 tokens), got {max_length}")
    stream = iter_generate(seed, max_depth=max_depth, max_args=max_args, operator_prob=operator_prob,
                           min_length=min_length, max_length=max_length, min_depth=min_depth,
                           allow_value_root=allow_value_root, exclude=exclude)
    step = max(1, num_examples // 10)
    for example in stream:
        out.append(example)
        if progress and len(out) % step == 0:
            import sys
            print(f"generated {len(out)}/{num_examples}", file=sys.stderr, flush=True)
        if len(out) == num_examples:
            break
    return out


# ----------------------------------------------------------------------------------------------
# writing, evaluating, parsing
# ----------------------------------------------------------------------------------------------

def to_string(tree: Tree) -> str:
    """The official written form: ``( ( [OP a1 ) a2 ) ... ] )``, or the bare digit."""
    if isinstance(tree, int):
        return str(tree)
    op, args = tree
    text = f"( {op} {to_string(args[0])} )"
    for arg in args[1:]:
        text = f"( {text} {to_string(arg)} )"
    return f"( {text} {END} )"


def to_tokens(tree: Tree) -> List[str]:
    """The tokens without parentheses (prefix order, each operator closed by ``]``)."""
    if isinstance(tree, int):
        return [str(tree)]
    out = [tree[0]]
    for arg in tree[1]:
        out.extend(to_tokens(arg))
    out.append(END)
    return out


def strip_parentheses(tokens: Sequence[str]) -> List[str]:
    return [t for t in tokens if t not in ("(", ")")]


def _median(values: Sequence[int]) -> int:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2


def evaluate(tree: Tree) -> int:
    """The value (0-9) of a tree."""
    if isinstance(tree, int):
        return tree
    op, args = tree
    values = [evaluate(a) for a in args]
    if op == "[MIN":
        return min(values)
    if op == "[MAX":
        return max(values)
    if op == "[MED":
        return _median(values)
    if op == "[SM":
        return sum(values) % 10
    raise ValueError(f"unknown operator {op!r}; expected one of {OPERATORS}")


class _ParseError(ValueError):
    pass


def parse_expression(tokens: Sequence[str]) -> Tree:
    """Parse the official written form (with parentheses) into a tree.

    Raises:
        ValueError: the tokens are not a well-formed expression (message says where).
    """
    tokens = list(tokens)
    if not tokens:
        raise _ParseError("empty expression")
    tree, pos = _parse_node(tokens, 0)
    if pos != len(tokens):
        raise _ParseError(f"unexpected token {tokens[pos]!r} at token {pos + 1} after a complete expression")
    return tree


def _expect(tokens: Sequence[str], pos: int, wanted: str) -> int:
    if pos >= len(tokens):
        raise _ParseError(f"expression ends early: expected {wanted!r} at token {pos + 1}")
    if tokens[pos] != wanted:
        raise _ParseError(f"expected {wanted!r} at token {pos + 1}, got {tokens[pos]!r}")
    return pos + 1


def _parse_node(tokens: Sequence[str], pos: int) -> Tuple[Tree, int]:
    # A node is a digit or k opening parentheses, an operator, k-1 arguments each followed by ')',
    # then '] )'. The k leading '(' all belong to this node because an argument starts after the operator.
    if pos >= len(tokens):
        raise _ParseError(f"expression ends early at token {pos + 1}")
    tok = tokens[pos]
    if tok in DIGITS:
        return int(tok), pos + 1
    if tok != "(":
        raise _ParseError(f"expected a digit or '(' at token {pos + 1}, got {tok!r}")
    opens = 0
    while pos < len(tokens) and tokens[pos] == "(":
        opens += 1
        pos += 1
    if pos >= len(tokens) or tokens[pos] not in OPERATORS:
        got = tokens[pos] if pos < len(tokens) else "end of line"
        raise _ParseError(f"expected an operator {OPERATORS} at token {pos + 1}, got {got!r}")
    if opens < 2:
        raise _ParseError(f"operator {tokens[pos]!r} at token {pos + 1} has no argument")
    op = tokens[pos]
    pos += 1
    args = []
    for _ in range(opens - 1):
        arg, pos = _parse_node(tokens, pos)
        args.append(arg)
        pos = _expect(tokens, pos, ")")
    pos = _expect(tokens, pos, END)
    pos = _expect(tokens, pos, ")")
    return (op, tuple(args)), pos


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------

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
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n").rstrip("\r")
            try:
                examples.append(_parse_line(line, check_labels))
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
    """Write examples as ``label<TAB>expression`` lines; returns how many."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(f"{ex}\n")
            n += 1
    return n
