"""Benchmark suite: trunk throughput, feature extraction, head training, inference backends, `predict` beside a
peer package and peak memory, written to BENCHMARKS.md and bench.json. Run ``python -m benchmarks --help``.

The run order is in ``__main__``; each phase runs in its own interpreter (``phases``), its measurements in
``extraction``, ``training`` and ``inference``, the peer in ``peer``; ``summary``, ``findings`` and ``report``
turn the results into the headline figures and BENCHMARKS.md.
"""
