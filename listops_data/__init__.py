"""ListOps (Nangia & Bowman 2018): generator, evaluator, parser and file reader.

Pure Python: this package imports neither torch nor fairseq (its argument checks are those of the
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

The package is built from one-idea modules: `listops_data.trees` (the vocabulary, the tree type, its value, length,
depth and written form), `listops_data.generation` (the generator), `listops_data.parsing` (the written form back into a
tree) and `listops_data.example_files` (an example, and the file reader and writer). ``toolbox_core.listops`` and
``stability_toolbox.listops``, where this code used to live, still name this package (deprecated aliases).

Examples:
    >>> from listops_data import generate, to_string, evaluate, parse_expression
    >>> examples = generate(3, seed=0, max_length=30)
    >>> label, expression = examples[0].label, examples[0].expression
    >>> evaluate(parse_expression(expression.split())) == label
    True
"""

from .example_files import ListOpsExample, read_listops, write_listops
from .generation import count_trees, generate, generate_tree, iter_generate
from .parsing import parse_expression
from .trees import (DIGITS, END, OPERATORS, VOCABULARY, Tree, evaluate, strip_parentheses, to_string, to_tokens,
                    tree_depth, tree_length)

__all__ = [
    "OPERATORS", "END", "DIGITS", "VOCABULARY", "Tree", "ListOpsExample",
    "generate", "generate_tree", "iter_generate", "count_trees", "to_string", "to_tokens", "evaluate",
    "parse_expression", "tree_depth", "tree_length", "read_listops", "write_listops",
    "strip_parentheses",
]
