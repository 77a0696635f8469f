"""Windowed state: pure window logic (:mod:`tables.window`, :mod:`tables.aggregator`) and
the Faust table holding it (:mod:`tables.bars`, imported by the agents)."""
