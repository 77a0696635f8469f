"""The query layer between the HTTP views and storage: series building
(:mod:`query.series`: sealed ranges, live minutes, merge, fill, rollups) and price
statistics (:mod:`query.prices`, over the pure per-second functions of
:mod:`query.price_stats`). Failures raise :class:`core.errors.StorageUnavailable`.

The classes here take their dependencies explicitly (the TimescaleDB pool service, the
Redis stores, settings values); the views only parse the request, call them and
serialise the answer.

May import: :mod:`core`, :mod:`sql`, :mod:`tables`, :mod:`stores`, :mod:`feeds`. Layer 3 of
``docs/architecture.md``.
"""
