"""Benchmarks (``python -m mpicnn.bench <name>``): side by side with peers, as ratios."""
