"""Benchmarks with ratios against plain reference implementations: ``python -m bench [names...]``.

finetune, generate, classifier, scaling, pipeline (see bench/README.md). Results: reports/bench.json,
reports/bench.md, reports/bench_scaling.png.
"""
