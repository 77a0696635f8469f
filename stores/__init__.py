"""Redis, a store per role on one shared connection (:mod:`stores.connection`): latest
prices (:mod:`stores.latest`), per-second statistics (:mod:`stores.stats`), live bars
(:mod:`stores.live_bars`), the ``/ohlcv`` cache (:mod:`stores.ohlcv_cache`), the mode and
ingest status (:mod:`stores.control`) and the replay protocol (:mod:`stores.replay_control`).
The write buffer (:mod:`stores.buffer`) wraps the writes of the first three during
outages. Every key format is in :mod:`stores.keys`.

May import: :mod:`core`. Layer 1 of ``docs/architecture.md``.
"""
