"""The market replay simulator (``faust -A app replay``): sources of recorded trades and
stored bars (:mod:`feeds.replay.sources`, :mod:`feeds.replay.trade_files`,
:mod:`feeds.replay.bar_ticks`), the controller with the simulated clock
(:mod:`feeds.replay.controller`) and the run (:mod:`feeds.replay.simulator`).

May import: :mod:`core`, :mod:`sql`, :mod:`stores`.
"""
