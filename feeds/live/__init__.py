"""Live ingest inside the worker (leader only): the marketflow exchange TCP adapter
(:mod:`feeds.live.marketflow_tcp`), the CryptoCompare stream (:mod:`feeds.live.cryptocompare`),
the test-mode generator (:mod:`feeds.live.generator`), the publisher to the ``ticks`` topic
(:mod:`feeds.live.publisher`) and the manager that runs them by mode
(:mod:`feeds.live.manager`).

May import: :mod:`core`, :mod:`stores`.
"""
