"""The ListOps parser: the official written form (with parentheses) back into a tree.

Examples:
    >>> from listops_data.parsing import parse_expression
    >>> parse_expression("( ( ( [MAX 2 ) 9 ) ] )".split())
    ('[MAX', (2, 9))
"""

from typing import List, Sequence, Tuple

from .trees import DIGITS, END, OPERATORS, Tree

__all__ = ["parse_expression"]


class _ParseError(ValueError):
    """A malformed expression (a ValueError; the file reader adds the file and line)."""


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
