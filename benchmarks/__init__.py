"""The benchmark suite: ``python -m torchreparam bench`` (see ``docs/benchmarks.md``).

Modules, from the bottom up: ``timing`` (interleaved rounds, paired ratios), ``models``,
``gpt2`` (optional, Hugging Face ``transformers``), ``original`` (the original torchreparam,
re-implemented as a peer), ``peers``, ``context``, ``report``, ``subprocess_run``, the cases
(``latency``, ``maml``, ``population``, ``large``, ``optim``, ``wrap``), the workers that run a
case in a fresh process (``worker``, ``gpt2_worker``), ``suite``, ``page`` and ``cli``.

Nothing is imported here, so that ``python -m torchreparam._bench.worker`` stays light.
"""
