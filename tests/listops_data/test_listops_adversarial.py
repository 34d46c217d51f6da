"""ListOps under adversarial use: deep nesting, impossible generator constraints, bad bytes."""

import itertools
import random
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

import listops_data
from listops_data import (count_trees, evaluate, generate, generate_tree, parse_expression, read_listops,
                     to_string, to_tokens, tree_depth, tree_length)

DEPTH = 3000  # far beyond Python's recursion limit (1000)


def nested(depth: int):
    """[SM [SM ... [SM 1 2 ] ... 2 ] 2 ]: depth operators, each with a nested first argument."""
    tree = ("[SM", (1, 2))
    for _ in range(depth - 2):
        tree = ("[SM", (tree, 2))
    return tree


def test_deep_trees_need_no_recursion():
    tree = nested(DEPTH)
    assert tree_depth(tree) == DEPTH
    assert tree_length(tree) == 3 * (DEPTH - 1) + 1
    assert evaluate(tree) == (1 + 2 * (DEPTH - 1)) % 10
    text = to_string(tree)
    assert to_string(parse_expression(text.split())) == text  # (== on the tuples would recurse in C)
    assert to_tokens(tree)[:2] == ["[SM", "[SM"]


def test_deep_file_reads(tmp_path):
    tree = nested(DEPTH)
    path = tmp_path / "deep.tsv"
    path.write_text(f"{evaluate(tree)}\t{to_string(tree)}\n")
    (example,) = read_listops(path, check_labels=True)
    assert example.label == evaluate(tree)


def reference_tree(rng, depth, max_depth, max_args, operator_prob):
    """The official generator's recursion, written out (the reference for the iterative one)."""
    r = rng.random() if depth < max_depth else 1.0
    if r > operator_prob:
        return rng.choice(range(10))
    n = rng.randint(2, max_args)
    args = tuple(reference_tree(rng, depth + 1, max_depth, max_args, operator_prob) for _ in range(n))
    return (rng.choice(listops_data.OPERATORS), args)


@given(st.integers(0, 10 ** 6), st.integers(1, 25), st.integers(2, 5), st.floats(0.05, 0.45))
def test_iterative_generator_draws_what_the_recursive_one_draws(seed, max_depth, max_args, p):
    a, b = random.Random(seed), random.Random(seed)
    for _ in range(5):
        assert generate_tree(a, 1, max_depth, max_args, p) == reference_tree(b, 1, max_depth, max_args, p)


def all_trees(max_depth, max_args, max_length):
    """Every tree of depth <= max_depth and length <= max_length, by brute force."""
    if max_depth == 1:
        return list(range(10))
    smaller = [t for t in all_trees(max_depth - 1, max_args, max_length - 2)]
    out = list(range(10))
    for k in range(2, max_args + 1):
        for args in itertools.product(smaller, repeat=k):
            if 2 + sum(tree_length(a) for a in args) <= max_length:
                out.extend((op, args) for op in listops_data.OPERATORS)
    return out


@pytest.mark.parametrize("max_depth, max_args, max_length, min_length, min_depth, allow", [
    (2, 3, 5, 1, 1, False), (3, 2, 7, 1, 1, True), (3, 2, 7, 5, 3, False), (2, 5, 6, 6, 2, False),
])
def test_count_trees_equals_enumeration(max_depth, max_args, max_length, min_length, min_depth, allow):
    trees = [t for t in all_trees(max_depth, max_args, max_length)
             if min_length <= tree_length(t) and tree_depth(t) >= min_depth and (allow or not isinstance(t, int))]
    assert count_trees(max_length, min_length=min_length, min_depth=min_depth, max_depth=max_depth,
                       max_args=max_args, allow_value_root=allow) == len(trees)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_examples=1, max_length=3), "max_length must be >= 4"),
    (dict(num_examples=1, max_depth=1), "max_depth must be >= 2"),
    (dict(num_examples=1, min_depth=5, max_length=10), "max_length must be >= 13"),
    (dict(num_examples=1, min_depth=6, max_depth=5), "min_depth"),
    (dict(num_examples=1, max_depth=2, max_args=2, min_length=5), "min_length must be <= 4"),
    (dict(num_examples=401, max_length=4), "more than the 400 distinct trees"),
    (dict(num_examples=11, max_length=1, allow_value_root=True), "more than the 10 distinct trees"),
    (dict(num_examples=1, operator_prob=1.0), "operator_prob"),
    (dict(num_examples=-1), "num_examples"),
])
def test_impossible_constraints_fail_at_once(kwargs, match):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        generate(**kwargs)
    assert time.perf_counter() - start < 2.0


def test_all_400_small_trees_then_stop():
    out = generate(400, max_length=4)
    assert len({ex.expression for ex in out}) == 400


def test_rarely_met_constraints_give_up_instead_of_hanging():
    with pytest.raises(ValueError, match="met too rarely"):
        generate(5, min_depth=15, operator_prob=0.05, max_rejections=300)


def test_numpy_counts_are_accepted():
    np = pytest.importorskip("numpy")
    assert len(generate(np.int64(3), max_length=np.int64(20))) == 3


@pytest.mark.parametrize("content, match", [
    (b"0\t( ( [MIN 1 ) ] )\n3\t\xe9\n", r":2: not UTF-8 text \(byte 0xe9"),
    (b"0\t( ( [MIN 1 ) ] )\n0\t( [MIN ] )\n", r":2: operator '\[MIN' at token 2 has no argument"),
    (b"x\t1\n", r":1: label must be one digit"),
])
def test_file_errors_name_path_and_line(tmp_path, content, match):
    path = tmp_path / "bad.tsv"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"^{path}{match}"):
        read_listops(path)


def test_write_listops_is_atomic(tmp_path):
    path = tmp_path / "out.tsv"
    path.write_text("old\n")

    def examples():
        yield from generate(3, max_length=10)
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError):
        listops_data.write_listops(path, examples())
    assert path.read_text() == "old\n"


# ---------------------------------------------------------------- malformed trees (issue 21)

FUNCTIONS = [evaluate, to_string, to_tokens, tree_depth, tree_length]


def bury(node, depth, rng):
    """``node`` as an argument ``depth`` operators down, beside random digits."""
    for _ in range(depth):
        args = [rng.randrange(10) for _ in range(rng.randint(1, 3))]
        args.insert(rng.randrange(len(args) + 1), node)
        node = (rng.choice(listops_data.OPERATORS), tuple(args))
    return node


@pytest.mark.parametrize("op", listops_data.OPERATORS)
@pytest.mark.parametrize("depth", [0, 1, 5, DEPTH])
@pytest.mark.parametrize("function", FUNCTIONS, ids=lambda f: f.__name__)
def test_operator_without_argument_is_a_value_error_naming_it(op, depth, function):
    """[MAX ] has no value (the official generator gives every operator 2-5 arguments and its
    evaluator has none for an empty list): ValueError naming the expression, never IndexError."""
    tree = bury((op, ()), depth, random.Random(depth))
    with pytest.raises(ValueError, match=rf"malformed ListOps expression '.+': operator '\{op}' has no argument "
                                         rf"\(\{op} \]\)") as info:
        function(tree)
    if depth <= 5:  # the whole expression is in the message (a long one is cut at 200 characters)
        assert repr(" ".join(to_tokens_unchecked(tree))) in str(info.value)


def to_tokens_unchecked(tree):
    if isinstance(tree, int):
        return [str(tree)]
    return [tree[0], *[t for a in tree[1] for t in to_tokens_unchecked(a)], "]"]


@pytest.mark.parametrize("leaf, match", [(12, "value 12 is not a digit"), (-1, "value -1 is not a digit"),
                                         (True, "is a bool"), ("3", "neither a digit"), (None, "neither a digit"),
                                         (("[SM",), "neither a digit")])
@pytest.mark.parametrize("function", FUNCTIONS, ids=lambda f: f.__name__)
def test_malformed_leaves_are_value_errors(leaf, match, function):
    with pytest.raises(ValueError, match=match):
        function(("[SM", (1, ("[MAX", (leaf, 4)))))


@pytest.mark.parametrize("text", ["( [MAX ] )", "[MAX ]", "( ( [MED ] ) )", "( ( ( [SM 1 ) ( [MIN ] ) ) ] )"])
def test_written_operator_without_argument_is_refused_by_the_reader(tmp_path, text):
    path = tmp_path / "bad.tsv"
    path.write_text(f"0\t( ( [MIN 1 ) ] )\n0\t{text}\n")
    with pytest.raises(ValueError, match=rf"^{path}:2: "):
        read_listops(path)


def test_one_argument_operators_still_evaluate():
    # parse_expression accepts ( ( [OP a ) ] ): the value of the operator over one argument
    for op, expected in zip(listops_data.OPERATORS, (7, 7, 7, 7)):
        tree = parse_expression(f"( ( {op} 7 ) ] )".split())
        assert tree == (op, (7,)) and evaluate(tree) == expected
