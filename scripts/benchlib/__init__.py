"""The code behind scripts/bench (see the docstring of scripts/bench.py).

Kept free of imports: scripts/bench_tasks.py imports ``benchlib.rss`` into the plain
consumer whose memory the scale benchmark measures.
"""
