"""Everything that produces ticks or bars from outside, one sub-package per job:

* :mod:`feeds.live` — live ingest inside the worker: the exchange TCP adapter, the
  CryptoCompare stream, the test generator, the publisher and the manager;
* :mod:`feeds.replay` — the market replay simulator: its sources, its controller (and
  simulated clock) and the run;
* :mod:`feeds.history` — history: REST clients, backfill, on-demand fetch, gaps;
* :mod:`feeds.emulator` — the exchange emulator, a development tool (``python -m
  feeds.emulator``); nothing in the worker imports it.

May import: :mod:`core`, :mod:`sql`, :mod:`tables`, :mod:`stores`. Inside ``feeds/``,
``live``, ``replay`` and ``history`` do not import each other; ``emulator`` may import
them. Layer 2 of ``docs/architecture.md``.
"""
