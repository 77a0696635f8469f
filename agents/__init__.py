"""Faust agents: tick aggregation (:mod:`agents.bars`), the TimescaleDB sink
(:mod:`agents.sink`) and on-demand history (:mod:`agents.history`)."""

from agents import bars, history, sink

__all__ = ["bars", "history", "sink"]
