"""The shared kernel: errors (:mod:`core.errors`), settings (:mod:`core.config`), wire
formats and the bar shape (:mod:`core.models`), time units and boundaries
(:mod:`core.timeutil`), name validation (:mod:`core.names`), the actor state holder
(:mod:`core.state`), Prometheus metrics (:mod:`core.metrics`), topic declarations
(:mod:`core.topics`) and topic administration (:mod:`core.admin`).

May import: no other package of marketflow (only libraries). Layer 0 of
``docs/architecture.md``.
"""
