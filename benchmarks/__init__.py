"""The measurements behind ``results/``: speed against the peers (``bench_*``) and quality sweeps on real data.

A package of runnable modules. Each imports the toolbox's libraries (admin_torch, reinmax, sign_optim,
stability_toolbox, fairseq_plugins), third-party packages and the helpers here, never anything from
``tests/``: ``harness`` (timing), ``sweep`` (parallel runs, statistics, result files), ``mnist`` (the
MNIST reader), ``memory``, ``peers``, ``hf_families``, ``fairseq_data`` and ``lm_recipe_runs``.

Run one from the repository root (or with the root first on ``PYTHONPATH``: fairscale installs an
unrelated top-level ``benchmarks`` package into site-packages)::

    python -m benchmarks.<name> --help
    python -m benchmarks.bench_sign_optim --quick
"""
