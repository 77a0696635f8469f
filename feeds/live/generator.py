"""Test-mode input: synthetic ticks, a random walk per exchange and pair.

Needs nothing outside the process. Ticks carry ``source = "test"`` so consumers can tell
them from live data; prices start near realistic levels and move by small Gaussian
log-returns (always > 0).
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Sequence

from core.models import Tick
from core.state import StateHolder
from core.timeutil import now_ms
from feeds.live.base import TickSink

__all__ = ["START_PRICES", "SyntheticTicks", "TestGenerator"]

#: rough starting prices (quote currency per base unit) of the default pairs
START_PRICES = {"BTCUSDT": 96_000.0, "ETHUSDT": 3_300.0, "SOLUSDT": 190.0,
                "TONUSDT": 5.5, "DOGEUSDT": 0.32}


class SyntheticTicks:
    """Pure random-walk tick maker.

    Args:
        exchanges: exchange names.
        pairs: symbols (unknown ones start at 100.0).
        seed: RNG seed for reproducible walks.
        vol: standard deviation of one step's log-return.
    """

    def __init__(self, exchanges: Sequence[str], pairs: Sequence[str], seed: int | None = None,
                 vol: float = 2e-4) -> None:
        self._rng = random.Random(seed)
        self.vol = vol
        self.keys = [(e, p) for e in exchanges for p in pairs]
        if not self.keys:
            raise ValueError("the generator needs at least one exchange and one pair")
        self._price = {k: START_PRICES.get(k[1], 100.0) * self._rng.uniform(0.995, 1.005)
                       for k in self.keys}
        self._seq = 0
        #: distinguishes this walk's trade ids (``<run_id>-<seq>``) from other runs'
        self.run_id = f"{self._rng.getrandbits(32):08x}" if seed is None else f"s{seed}"

    def next(self, ts_ms: int) -> Tick:
        """One tick of a random key, stamped ``ts_ms`` (UTC epoch ms)."""
        key = self._rng.choice(self.keys)
        p = self._price[key] * math.exp(self._rng.gauss(0.0, self.vol))
        self._price[key] = p
        self._seq += 1
        digits = 2 if p >= 1000 else 3 if p >= 1 else 6
        qty = round(self._rng.expovariate(1.0) * 1000 / max(p, 1e-9), 6) or 1e-6
        return Tick(key[0], key[1], round(p, digits) or 10.0 ** -digits, qty, ts_ms,
                    f"{self.run_id}-{self._seq}", "test", ts_ms)


class TestGenerator:
    """Publishes synthetic ticks at ``rate_per_s`` (all keys together) until cancelled.

    Args:
        maker: the random walk.
        rate_per_s: ticks per second.
        sink: where ticks go.
        state: reported in ``/health``.
        tick_s: publishing period; each period publishes the ticks due by then.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, maker: SyntheticTicks, rate_per_s: float, sink: TickSink,
                 state: StateHolder, tick_s: float = 0.05) -> None:
        self.maker = maker
        self.rate_per_s = rate_per_s
        self.sink = sink
        self.state = state
        self.tick_s = tick_s

    async def run(self) -> None:
        """Generate until cancelled."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        sent = 0
        self.state.set_state("connected")
        try:
            while True:
                await asyncio.sleep(self.tick_s)
                due = int((loop.time() - start) * self.rate_per_s) - sent
                if due <= 0:
                    continue
                ts = now_ms()
                ticks = [self.maker.next(ts) for _ in range(due)]
                sent += due
                self.state.last_message_ms = ts
                self.state.messages += due
                self.state.ticks += due
                await self.sink.publish(ticks)
        finally:
            self.state.set_state("stopped")
