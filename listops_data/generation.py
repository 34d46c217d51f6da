"""The ListOps generator: trees drawn as the official ``make_data.py`` of nyu-mll/spinn draws them, kept unique.

Below the depth cap each node is an operator with probability ``operator_prob`` (official 0.25), an operator takes 2
to ``max_args`` (official 5) arguments, a node at depth ``max_depth`` (official 20) is a value; the draws from
`random.Random` come in the official order. Constraints no tree can meet are a ValueError naming the argument at once
(`count_trees` counts the distinct trees in range, exactly).

Examples:
    >>> from listops_data.generation import generate
    >>> [example.label for example in generate(3, seed=0, max_length=30)] == [
    ...     example.label for example in generate(3, seed=0, max_length=30)]   # same seed, same examples
    True
"""

import random
import sys
from typing import Iterable, Iterator, List, Optional, Tuple

from toolbox_core import checks

from .example_files import ListOpsExample
from .trees import OPERATORS, Tree, evaluate, to_string, tree_depth, tree_length

__all__ = ["count_trees", "generate", "generate_tree", "iter_generate"]


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
