"""Historical 1-minute bars: REST clients (:mod:`feeds.history.rest`), resumable backfill
(:mod:`feeds.history.backfill`), on-demand fetch through dynamic topics
(:mod:`feeds.history.on_demand`) and gap detection and repair (:mod:`feeds.history.gaps`).

May import: :mod:`core`, :mod:`sql`, :mod:`tables`, :mod:`stores`.
"""
