"""Faust agents, registered by functions that receive their dependencies: tick aggregation
(:class:`agents.bars.BarAggregation`), the TimescaleDB sink
(:func:`agents.sink.register_sink`), the on-demand history coordinator
(:func:`agents.on_demand.register_on_demand_agent`) and the leader's retention timer
(:func:`agents.retention.register_retention`).

May import: everything below it (:mod:`core`, :mod:`sql`, :mod:`tables`, :mod:`stores`,
:mod:`feeds`, :mod:`query`). Layer 4 of ``docs/architecture.md``.
"""

from agents import bars, on_demand, retention, sink

__all__ = ["bars", "on_demand", "retention", "sink"]
