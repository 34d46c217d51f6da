"""ListOps generator, parser and reader, checked by an evaluator written independently here."""

import random
import statistics

import numpy as np
import pytest

from listops_data import (OPERATORS, ListOpsExample, generate, generate_tree, parse_expression,
                     read_listops, to_string, tree_depth, write_listops)


def independent_value(expression: str) -> int:
    """Evaluate an expression from its tokens with a stack, ignoring parentheses; MED is int(numpy.median)."""
    stack = []   # open operator frames: [op, args]
    result = None
    for tok in expression.split():
        if tok in ("(", ")"):
            continue
        if tok.startswith("["):
            stack.append([tok, []])
            continue
        if tok == "]":
            op, args = stack.pop()
            value = {"[MIN": min, "[MAX": max,
                     "[MED": lambda a: int(np.median(a)),
                     "[SM": lambda a: int(np.sum(a)) % 10}[op](args)
        else:
            value = int(tok)
        if stack:
            stack[-1][1].append(value)
        else:
            assert result is None, "two top-level values"
            result = value
    assert not stack and result is not None
    return result


def max_nesting(expression: str) -> int:
    depth = best = 0
    for tok in expression.split():
        if tok.startswith("["):
            depth += 1
            best = max(best, depth)
        elif tok == "]":
            depth -= 1
    return best


@pytest.mark.parametrize("name", ["test_d20s.tsv", "valid.tsv"])
def test_official_labels_reproduced(shared_data, name):
    path = shared_data / "listops" / name
    if not path.exists():
        pytest.skip(f"{path} not found")
    lines = path.read_text().splitlines()
    examples = read_listops(path, check_labels=True)  # the library evaluator agrees with every label
    assert len(examples) == len(lines) == {"test_d20s.tsv": 10000, "valid.tsv": 1000}[name]
    for line, ex in zip(lines, examples):
        label, expression = line.split("\t")
        assert independent_value(expression) == int(label) == ex.label
        assert ex.expression == expression
        assert to_string(parse_expression(expression.split())) == expression  # round trip


def test_official_bare_digit_line(shared_data):
    path = shared_data / "listops" / "test_d20s.tsv"
    if not path.exists():
        pytest.skip(f"{path} not found")
    bare = [ex for ex in read_listops(path) if ex.expression == "9"]
    assert bare == [ListOpsExample(9, "9")]


def test_median_even_count_rounds_down():
    # MED of [2, 5] is int(numpy.median) = int(3.5) = 3; of [1, 2, 3, 4] it is 2
    assert parse_expression("( ( ( [MED 2 ) 5 ) ] )".split()) == ("[MED", (2, 5))
    from listops_data import evaluate
    assert evaluate(("[MED", (2, 5))) == 3
    assert evaluate(("[MED", (1, 2, 3, 4))) == 2
    assert evaluate(("[MED", (9, 0, 9))) == 9


@pytest.fixture(scope="module")
def generated():
    return generate(2000, seed=3)


def test_generator_invariants(generated):
    assert len({ex.expression for ex in generated}) == len(generated)  # unique trees
    for ex in generated:
        assert independent_value(ex.expression) == ex.label
        assert 0 <= ex.label <= 9
        tree = parse_expression(ex.expression.split())
        assert to_string(tree) == ex.expression
        assert max_nesting(ex.expression) <= 19  # operators only above the depth cap of 20
        assert tree_depth(tree) <= 20
        stack = [tree]
        while stack:
            node = stack.pop()
            if not isinstance(node, int):
                assert node[0] in OPERATORS and 2 <= len(node[1]) <= 5
                stack.extend(node[1])
    assert set(ex.label for ex in generated) == set(range(10))
    assert {tok for ex in generated for tok in ex.tokens if tok.startswith("[")} == set(OPERATORS)


def test_generator_operator_probability(generated):
    # an argument is an operator with probability 0.25 (official VALUE_P, compared as r > VALUE_P -> value)
    ops = args = 0
    for ex in generated:
        stack = [parse_expression(ex.expression.split())]
        while stack:
            node = stack.pop()
            if not isinstance(node, int):
                args += len(node[1])
                ops += sum(not isinstance(a, int) for a in node[1])
                stack.extend(node[1])
    assert 0.22 < ops / args < 0.28
    lengths = [len(ex.tokens) for ex in generated]
    assert 25 < statistics.mean(lengths) < 60


def test_generator_seeded_and_official_call_order():
    assert generate(50, seed=7) == generate(50, seed=7)
    assert generate(50, seed=7) != generate(50, seed=8)
    # the same draws as the official script's generate_tree(1) with random.seed(s), written out here
    rng = random.Random(11)

    def official(depth):
        r = rng.random() if depth < 20 else 1
        if r > 0.25:
            return rng.choice(range(10))
        values = [official(depth + 1) for _ in range(rng.randint(2, 5))]
        return (rng.choice(["[MIN", "[MAX", "[MED", "[SM"]), tuple(values))

    ours = random.Random(11)
    for _ in range(200):
        assert generate_tree(ours) == official(1)


@pytest.mark.parametrize("min_length,max_length,max_depth", [(1, 10, 20), (20, 40, 20), (1, None, 3)])
def test_generator_limits(min_length, max_length, max_depth):
    examples = generate(200, seed=1, min_length=min_length, max_length=max_length, max_depth=max_depth)
    assert len(examples) == 200
    for ex in examples:
        assert min_length <= len(ex.tokens) <= (max_length or 10 ** 9)
        assert tree_depth(parse_expression(ex.expression.split())) <= max_depth
        assert independent_value(ex.expression) == ex.label


def test_generator_exclude_and_bare_roots():
    first = generate(100, seed=0)
    again = generate(100, seed=0, exclude=[ex.expression for ex in first[:50]])
    assert not {ex.expression for ex in first[:50]} & {ex.expression for ex in again}
    with_bare = generate(300, seed=0, allow_value_root=True)
    assert any(ex.expression.isdigit() for ex in with_bare)
    assert not any(ex.expression.isdigit() for ex in generate(300, seed=0))


@pytest.mark.parametrize("kwargs", [dict(num_examples=-1), dict(num_examples=5, max_depth=0),
                                    dict(num_examples=5, operator_prob=1.5), dict(num_examples=5, max_args=1),
                                    dict(num_examples=5, max_length=5, min_length=10),
                                    dict(num_examples=5, max_length=2)])
def test_generator_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(k for k in kwargs if k != "num_examples"), "num_examples")):
        generate(**kwargs)


def test_write_read_round_trip(tmp_path, generated):
    path = tmp_path / "train.tsv"
    assert write_listops(path, generated[:100]) == 100
    assert read_listops(path, check_labels=True) == generated[:100]


@pytest.mark.parametrize("bad_line,message", [
    ("3 ( ( ( [SM 1 ) 2 ) ] )", "exactly one tab"),
    ("12\t( ( ( [SM 1 ) 2 ) ] )", "label"),
    ("3\t( ( ( [SM 1 ) 2 ) ]", "ends early"),
    ("3\t( ( ( [XX 1 ) 2 ) ] )", "unknown token"),
    ("3\t( ( ( [SM 1 ) 2 ) ] ) 4", "unexpected token"),
    ("3\t( ( [SM 1 2 ) ] )", r"expected '\)' at token 5, got '2'"),
    ("3\t", "empty expression"),
])
def test_malformed_line_reports_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "data.tsv"
    path.write_text("0\t( ( ( ( ( [SM 6 ) 5 ) 9 ) 0 ) ] )\n" + bad_line + "\n")
    with pytest.raises(ValueError, match=rf"data\.tsv:2: .*{message}"):
        read_listops(path)


def test_wrong_label_reported_when_checked(tmp_path):
    path = tmp_path / "data.tsv"
    path.write_text("5\t( ( ( [SM 1 ) 2 ) ] )\n")
    assert read_listops(path)[0].label == 5
    with pytest.raises(ValueError, match=r"data\.tsv:1: label 5 but the expression evaluates to 3"):
        read_listops(path, check_labels=True)


def test_generate_script_matches_library(tmp_path):
    import subprocess
    import sys

    from fairseq_helpers import REPO_ROOT

    script = REPO_ROOT / "recipes" / "listops" / "generate.py"
    out = tmp_path / "gen.tsv"
    subprocess.run([sys.executable, str(script), "--num-examples", "30", "--seed", "4", "--output", str(out),
                    "--max-length", "40", "--max-depth", "6"], check=True, capture_output=True)
    assert read_listops(out, check_labels=True) == generate(30, seed=4, max_length=40, max_depth=6)
