"""Faust agents: tick aggregation (:mod:`agents.bars`) and the TimescaleDB sink
(:mod:`agents.sink`)."""

from agents import bars, sink

__all__ = ["bars", "sink"]
