"""ListOps trees: the vocabulary, the tree type, and what is read off a tree (value, length, depth, written form).

A tree is a digit 0-9 (``int``) or ``(operator, (argument trees...))``; tuples make it hashable, so a data set can
keep its trees unique. Every function here walks the tree iteratively (any depth) and checks each node on the way: a
malformed tree is a ValueError naming the expression, never an IndexError or a value outside 0-9.

Examples:
    >>> from listops_data.trees import evaluate, to_string, tree_length
    >>> tree = ("[SM", (6, 5, 9, 0))
    >>> evaluate(tree), tree_length(tree)
    (0, 6)
    >>> to_string(tree)
    '( ( ( ( ( [SM 6 ) 5 ) 9 ) 0 ) ] )'
"""

from typing import List, Sequence, Tuple, Union

__all__ = ["OPERATORS", "END", "DIGITS", "VOCABULARY", "Tree", "evaluate", "to_string", "to_tokens",
           "strip_parentheses", "tree_depth", "tree_length"]

OPERATORS: Tuple[str, ...] = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
DIGITS: Tuple[str, ...] = tuple(str(d) for d in range(10))
#: The tokens a model sees (parentheses removed): digits, operators, ``]``.
VOCABULARY: Tuple[str, ...] = DIGITS + OPERATORS + (END,)

# A tree is a digit (int) or (operator, (argument trees...)); tuples make it hashable for uniqueness.
Tree = Union[int, Tuple[str, Tuple["Tree", ...]]]


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
    """``tokens`` without the parentheses of the written form."""
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
