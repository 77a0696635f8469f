"""Windowed state: the pure window rules (:mod:`tables.window`), the aggregator that applies
tick batches and idle checks to per-key state (:mod:`tables.aggregator`), and the Faust
table holding that state (:func:`tables.bars.declare_window_table`).

May import: :mod:`core`. Layer 1 of ``docs/architecture.md``.
"""
