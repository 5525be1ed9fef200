"""The benchmark suite of torchreparam: ``python -m benchmarks`` from the repository's root.

It writes ``docs/benchmarks.md``. It is not part of the installed package: it needs the
repository, ``pip install -e .`` (or ``PYTHONPATH=src``), and optionally ``higher``,
``transformers`` and ``tqdm`` (``pip install -e ".[bench]"``).

It reaches torchreparam through its public API, with one deliberate exception: the ResNet-18
comes from ``torchreparam._resnet`` (the demo's model, used when torchvision is not
importable), so that the demo and the benchmarks time the same network.

Modules, from the bottom up: ``timing`` (interleaved rounds, paired ratios), ``models``,
``gpt2`` (optional, Hugging Face ``transformers``), ``original`` (the original torchreparam,
re-implemented as a peer), ``peers``, ``context``, ``report``, ``subprocess_run``, the cases
(``latency``, ``maml``, ``population``, ``large``, ``optim``, ``wrap``), the workers that run a
case in a fresh process (``worker``, ``gpt2_worker``), ``suite`` (the registry of cases:
``CASES``), ``page`` and ``cli``.

To add a case: write ``def my_case(ctx: Context) -> list[Table]`` in a module of its own
(see ``maml.py`` for a small one), then add one line to ``CASES`` in ``suite.py`` (and its
name to ``GPU_CASES`` if it should also run on CUDA). ``--only my-case`` then runs it alone.

Nothing is imported here, so that ``python -m benchmarks.worker`` stays light.
"""
