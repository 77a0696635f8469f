"""The query layer between the HTTP views and storage: series building
(:mod:`query.series`), price statistics (:mod:`query.prices` over the pure per-second
functions of :mod:`query.price_stats`) and their one error (:mod:`query.errors`).

The functions and classes here take their dependencies explicitly (the TimescaleDB pool
service, the Redis stores, settings values); they import no view, and the views only
parse the request, call them and serialise the answer.
"""
