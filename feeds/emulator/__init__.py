"""The exchange emulator, a development tool: a TCP server speaking the marketflow
exchange protocol (:mod:`feeds.emulator.server`; run it with ``python -m feeds.emulator``).
Outside the worker's import graph: nothing outside this package imports it.

May import: :mod:`core`, :mod:`feeds.live`, :mod:`feeds.replay`.
"""
