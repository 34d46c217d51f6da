"""ListOps (Nangia & Bowman 2018): generator, evaluator, parser and file reader.

Pure Python: this module imports neither torch nor fairseq (its argument checks are those of the
torch-free [`toolbox_core.checks`][toolbox_core.checks]), so a recipe that only wants the generator or the
reader does not load the fairseq plugins. The fairseq task ``listops`` (`fairseq_plugins.tasks.listops`)
reads its data with `read_listops`.

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
depth 1), and the trees of a data set are unique. It draws from `random.Random` in the
same order as the official script.

Lengths count the tokens without parentheses (what a latent-tree model reads), e.g. the example
above has length 6.

Examples:
    >>> from toolbox_core.listops import generate, to_string, evaluate, parse_expression
    >>> examples = generate(3, seed=0, max_length=30)
    >>> label, expression = examples[0].label, examples[0].expression
    >>> evaluate(parse_expression(expression.split())) == label
    True
"""

import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from . import checks
from .files import atomic_write

__all__ = [
    "OPERATORS", "END", "VOCABULARY", "Tree", "ListOpsExample",
    "generate", "generate_tree", "iter_generate", "count_trees", "to_string", "to_tokens", "evaluate",
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
    the node is a value. Iterative: any ``max_depth`` works without recursion.
    """
    frames: List[Tuple[int, int, List[Tree]]] = []  # (depth, number of arguments, arguments so far)
    d = depth
    while True:
        r = rng.random() if d < max_depth else 1.0
        if r <= operator_prob:
            frames.append((d, rng.randint(2, max_args), []))
            d += 1
            continue
        node: Tree = rng.choice(range(10))
        while True:  # attach the finished node; close every operator it completes
            if not frames:
                return node
            frame_depth, num_args, args = frames[-1]
            args.append(node)
            if len(args) < num_args:
                d = frame_depth + 1
                break
            frames.pop()
            node = (rng.choice(OPERATORS), tuple(args))


def _fold(tree: Tree, leaf, node):
    """Post-order fold without recursion: ``leaf(digit)`` for values, ``node(op, [child results])``.

    Every node is checked on the way (`_check_node`): a malformed tree is a ValueError naming
    the expression, never an IndexError or a value outside 0-9.
    """
    if _is_leaf(tree, tree):
        return leaf(tree)
    _check_node(tree, tree)
    stack = [(tree, [])]
    while True:
        (op, args), results = stack[-1]
        if len(results) < len(args):
            child = args[len(results)]
            if _is_leaf(child, tree):
                results.append(leaf(child))
            else:
                _check_node(child, tree)
                stack.append((child, []))
            continue
        stack.pop()
        value = node(op, results)
        if not stack:
            return value
        stack[-1][1].append(value)


def _is_leaf(value, root) -> bool:
    """Whether ``value`` is a digit 0-9; ValueError for another number (a bool, -1, 12)."""
    if isinstance(value, bool):
        _malformed(root, f"value {value!r} is a bool, not a digit 0-9")
    if not isinstance(value, int):
        return False
    if not 0 <= value <= 9:
        _malformed(root, f"value {value!r} is not a digit 0-9")
    return True


def _check_node(value, root) -> None:
    """ValueError unless ``value`` is ``(operator, (arguments...))`` with at least one argument.

    An operator needs an argument: the official ListOps (nyu-mll/spinn ``make_data.py``) draws 2 to 5
    and cannot even write an operator without one (``[OP`` is always followed by an argument before
    ``]``); min, max and median of nothing have no value, so ``[MAX ]`` is refused rather than given one.
    """
    if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], (tuple, list))):
        _malformed(root, f"node {value!r:.60} is neither a digit 0-9 nor (operator, (arguments...))")
    if not value[1]:
        _malformed(root, f"operator {value[0]!r} has no argument ({value[0]} ]); an operator takes at least one")


def _malformed(root, what: str):
    raise ValueError(f"malformed ListOps expression {_render(root)}: {what}")


def _render(tree, limit: int = 200) -> str:
    """The tokens of ``tree`` (checking nothing), for error messages; cut at ``limit`` characters."""
    out: List[str] = []
    todo = [tree]
    while todo and sum(len(t) + 1 for t in out) <= limit:
        item = todo.pop()
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) \
                and isinstance(item[1], (tuple, list)):
            out.append(item[0])
            todo.append(END)
            todo.extend(reversed(item[1]))
        else:
            out.append(item if isinstance(item, str) else repr(item))
    text = " ".join(out)
    return repr(text[:limit] + (" ..." if todo or len(text) > limit else ""))


def tree_length(tree: Tree) -> int:
    """Number of tokens without parentheses (operator, arguments and ``]`` of every node)."""
    return _fold(tree, lambda _: 1, lambda _, lengths: 2 + sum(lengths))


def tree_depth(tree: Tree) -> int:
    """Depth of the tree: 1 for a bare digit, 1 + the deepest argument for an operator."""
    return _fold(tree, lambda _: 1, lambda _, depths: 1 + max(depths))


def _max_length(max_depth: int, max_args: int, cap: int) -> int:
    """The longest tree of depth <= max_depth (saturating at ``cap``)."""
    longest = 1
    for _ in range(max_depth - 1):
        longest = min(cap, 2 + max_args * longest)
    return longest


def count_trees(max_length: int, *, min_length: int = 1, min_depth: int = 1, max_depth: int = 20,
                max_args: int = 5, allow_value_root: bool = False) -> float:
    """The number of distinct trees with length in ``[min_length, max_length]`` and depth in
    ``[min_depth, max_depth]`` (a float: exact up to 2**53). Cost grows as ``max_length**2``.

    Examples:
        >>> count_trees(4)    # [OP a b ]: 4 operators x 10 x 10 digits
        400.0
    """
    # by_depth[d][n]: trees of depth <= d and length n
    sizes = max_length + 1
    levels = min(max_depth, (max_length + 2) // 3)  # a tree of depth d has length >= 3d - 2
    by_depth = [[0.0] * sizes]
    for d in range(1, levels + 1):
        current = [0.0] * sizes
        current[1] = 10.0
        if d > 1:
            below = by_depth[d - 1]
            seq = below[:]  # sequences of k >= 1 trees of depth <= d - 1, by total length
            for k in range(2, max_args + 1):
                seq = [sum(seq[i] * below[n - i] for i in range(1, n)) for n in range(sizes)]
                for n in range(sizes - 2):
                    current[n + 2] += len(OPERATORS) * seq[n]
        by_depth.append(current)
    deepest = by_depth[levels]
    shallow = by_depth[min(levels, min_depth - 1)]
    total = 0.0
    for n in range(max(1, min_length), sizes):
        total += deepest[n] - shallow[n]
    if not allow_value_root and min_depth <= 1 and min_length <= 1:
        total -= 10.0  # the bare digits
    return total


def _check_int(name: str, value, low: int) -> int:
    return checks.as_int(name, value, minimum=low)


def _check_feasible(num_examples: int, *, max_depth: int, max_args: int, min_length: int,
                    max_length: Optional[int], min_depth: int, allow_value_root: bool) -> None:
    """ValueError naming the constraint when no tree (or too few distinct trees) can meet them."""
    if min_depth > max_depth:
        raise ValueError(f"min_depth ({min_depth}) must be <= max_depth ({max_depth})")
    shortest_depth = max(min_depth, 1 if allow_value_root else 2)
    if shortest_depth > max_depth:
        raise ValueError(f"max_depth must be >= 2 when allow_value_root is False (a root operator has depth 2), "
                         f"got {max_depth}")
    shortest = 3 * shortest_depth - 2
    if max_length is not None and max_length < shortest:
        raise ValueError(f"max_length must be >= {shortest} for trees of depth >= {shortest_depth} "
                         f"(a chain of two-argument operators), got {max_length}")
    cap = 10 ** 6
    longest = _max_length(max_depth, max_args, cap)
    if longest < cap and min_length > longest:
        raise ValueError(f"min_length must be <= {longest}, the longest tree of max_depth={max_depth} and "
                         f"max_args={max_args}, got {min_length}")
    upper = min(longest, max_length if max_length is not None else cap)
    if upper <= 120:  # otherwise there are astronomically many trees
        available = count_trees(upper, min_length=min_length, min_depth=min_depth, max_depth=max_depth,
                                max_args=max_args, allow_value_root=allow_value_root)
        if num_examples > available:
            raise ValueError(f"num_examples ({num_examples}) is more than the {int(available)} distinct trees that "
                             f"meet min_length={min_length}, max_length={max_length}, min_depth={min_depth}, "
                             f"max_depth={max_depth}, max_args={max_args}, allow_value_root={allow_value_root}")


def _check_generator_args(num_examples: Optional[int], max_depth, max_args, operator_prob, min_length, max_length,
                          min_depth, allow_value_root, max_rejections) -> dict:
    """Every argument of `generate` checked, and the constraints checked for feasibility."""
    args = dict(
        max_depth=_check_int("max_depth", max_depth, 1),
        max_args=_check_int("max_args", max_args, 2),
        min_length=_check_int("min_length", min_length, 1),
        min_depth=_check_int("min_depth", min_depth, 1),
        allow_value_root=checks.as_bool("allow_value_root", allow_value_root),
    )
    args["max_length"] = None if max_length is None else checks.as_int(
        "max_length", max_length, minimum=args["min_length"])
    args["operator_prob"] = checks.as_real("operator_prob", operator_prob, low=0.0, high=1.0,
                                           low_open=True, high_open=True)
    args["max_rejections"] = _check_int("max_rejections", max_rejections, 1)
    _check_feasible(num_examples or 1, **{k: args[k] for k in (
        "max_depth", "max_args", "min_length", "max_length", "min_depth", "allow_value_root")})
    return args


def iter_generate(seed: int = 0, *, max_depth: int = 20, max_args: int = 5, operator_prob: float = 0.25,
                  min_length: int = 1, max_length: Optional[int] = None,
                  min_depth: int = 1, allow_value_root: bool = False,
                  exclude: Iterable[str] = (), max_rejections: int = 1_000_000) -> Iterator[ListOpsExample]:
    """Yield unique ListOps examples (see `generate`) until ``max_rejections`` draws in a row
    give nothing new, which raises ValueError (the constraints are met too rarely, or every tree
    that meets them was produced)."""
    args = _check_generator_args(None, max_depth, max_args, operator_prob, min_length, max_length,
                                 min_depth, allow_value_root, max_rejections)
    return _generate(random.Random(seed), set(exclude), **args)


def _generate(rng: random.Random, seen: set, *, max_depth: int, max_args: int, operator_prob: float,
              min_length: int, max_length: Optional[int], min_depth: int, allow_value_root: bool,
              max_rejections: int) -> Iterator[ListOpsExample]:
    rejected = 0
    while True:
        if rejected >= max_rejections:
            raise ValueError(
                f"{rejected} trees in a row were out of range or already drawn: min_length={min_length}, "
                f"max_length={max_length}, min_depth={min_depth}, max_depth={max_depth}, max_args={max_args}, "
                f"operator_prob={operator_prob} are met too rarely, or every tree meeting them was produced")
        rejected += 1
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
        rejected = 0
        yield ListOpsExample(evaluate(tree), expression)


def generate(num_examples: int, seed: int = 0, *, max_depth: int = 20, max_args: int = 5,
             operator_prob: float = 0.25, min_length: int = 1, max_length: Optional[int] = None,
             min_depth: int = 1, allow_value_root: bool = False, exclude: Iterable[str] = (),
             progress: bool = False, max_rejections: int = 1_000_000) -> List[ListOpsExample]:
    """Generate ``num_examples`` unique ListOps examples from the official distribution.

    Constraints no tree can meet (a ``max_length`` or ``max_depth`` too small for any tree, a
    ``min_length`` beyond the longest tree, more examples than distinct trees exist in range) are a
    ValueError naming the argument at once; constraints met too rarely give up after
    ``max_rejections`` unproductive draws in a row, with ValueError.

    Args:
        num_examples: how many examples.
        seed: seed of the `random.Random` that draws the trees.
        max_depth: depth cap (official 20); nodes at this depth are values.
        max_args: most arguments of an operator (official 5; the fewest is 2).
        operator_prob: probability that a node below the cap is an operator (official 0.25).
        min_length, max_length: keep trees whose length (tokens without parentheses) is in range.
        min_depth: keep trees at least this deep (1 keeps bare digits when ``allow_value_root``).
        allow_value_root: keep bare-digit expressions (the official process draws them 75% of the
            time, but only 10 distinct ones exist; the official test set holds one, ``9<TAB>9``).
        exclude: expressions (as written, with parentheses) never to produce, e.g. a test set's.
        progress: print a progress line to stderr every 10% of the way.
        max_rejections: draws in a row that give no new example before giving up.

    Returns:
        A list of `ListOpsExample`, in the order drawn.
    """
    num_examples = _check_int("num_examples", num_examples, 0)
    progress = checks.as_bool("progress", progress)
    args = _check_generator_args(num_examples, max_depth, max_args, operator_prob, min_length, max_length,
                                 min_depth, allow_value_root, max_rejections)
    out: List[ListOpsExample] = []
    if num_examples == 0:
        return out
    step = max(1, num_examples // 10)
    for example in _generate(random.Random(seed), set(exclude), **args):
        out.append(example)
        if progress and len(out) % step == 0:
            print(f"generated {len(out)}/{num_examples}", file=sys.stderr, flush=True)
        if len(out) == num_examples:
            break
    return out


# ----------------------------------------------------------------------------------------------
# writing, evaluating, parsing
# ----------------------------------------------------------------------------------------------

def to_string(tree: Tree) -> str:
    """The official written form: ``( ( [OP a1 ) a2 ) ... ] )``, or the bare digit."""
    def node(op: str, args: List[str]) -> str:
        text = f"( {op} {args[0]} )"
        for arg in args[1:]:
            text = f"( {text} {arg} )"
        return f"( {text} {END} )"
    return _fold(tree, str, node)


def to_tokens(tree: Tree) -> List[str]:
    """The tokens without parentheses (prefix order, each operator closed by ``]``)."""
    def node(op: str, args: List[List[str]]) -> List[str]:
        out = [op]
        for arg in args:
            out.extend(arg)
        out.append(END)
        return out
    return _fold(tree, lambda d: [str(d)], node)


def strip_parentheses(tokens: Sequence[str]) -> List[str]:
    return [t for t in tokens if t not in ("(", ")")]


def _median(values: Sequence[int]) -> int:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2


_APPLY = {
    "[MIN": min,
    "[MAX": max,
    "[MED": _median,
    "[SM": lambda values: sum(values) % 10,
}


def evaluate(tree: Tree) -> int:
    """The value (0-9) of a tree (iterative: any depth)."""
    def node(op: str, values: List[int]) -> int:
        if op not in _APPLY:
            raise ValueError(f"unknown operator {op!r}; expected one of {OPERATORS}")
        return _APPLY[op](values)
    return _fold(tree, lambda d: d, node)


class _ParseError(ValueError):
    pass


def parse_expression(tokens: Sequence[str]) -> Tree:
    """Parse the official written form (with parentheses) into a tree, iteratively (any depth).

    A node is a digit, or ``k`` opening parentheses, an operator, ``k - 1`` arguments each followed
    by ``)``, then ``] )``. The ``k`` leading ``(`` all belong to this node because an argument
    starts after the operator.

    Raises:
        ValueError: the tokens are not a well-formed expression (message says where).
    """
    tokens = list(tokens)
    if not tokens:
        raise _ParseError("empty expression")
    pos = 0
    frames: List[Tuple[str, int, List[Tree]]] = []  # (operator, number of arguments, arguments so far)
    while True:
        if pos >= len(tokens):
            raise _ParseError(f"expression ends early at token {pos + 1}")
        tok = tokens[pos]
        if tok == "(":
            opens = 0
            while pos < len(tokens) and tokens[pos] == "(":
                opens += 1
                pos += 1
            if pos >= len(tokens) or tokens[pos] not in OPERATORS:
                got = tokens[pos] if pos < len(tokens) else "end of line"
                raise _ParseError(f"expected an operator {OPERATORS} at token {pos + 1}, got {got!r}")
            if opens < 2:
                raise _ParseError(f"operator {tokens[pos]!r} at token {pos + 1} has no argument")
            frames.append((tokens[pos], opens - 1, []))
            pos += 1
            continue
        if tok not in DIGITS:
            raise _ParseError(f"expected a digit or '(' at token {pos + 1}, got {tok!r}")
        node: Tree = int(tok)
        pos += 1
        while True:  # attach the finished node; close every operator it completes
            if not frames:
                if pos != len(tokens):
                    raise _ParseError(f"unexpected token {tokens[pos]!r} at token {pos + 1} "
                                      "after a complete expression")
                return node
            op, num_args, args = frames[-1]
            args.append(node)
            pos = _expect(tokens, pos, ")")
            if len(args) < num_args:
                break
            pos = _expect(tokens, pos, END)
            pos = _expect(tokens, pos, ")")
            frames.pop()
            node = (op, tuple(args))


def _expect(tokens: Sequence[str], pos: int, wanted: str) -> int:
    if pos >= len(tokens):
        raise _ParseError(f"expression ends early: expected {wanted!r} at token {pos + 1}")
    if tokens[pos] != wanted:
        raise _ParseError(f"expected {wanted!r} at token {pos + 1}, got {tokens[pos]!r}")
    return pos + 1


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
