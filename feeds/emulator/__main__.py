"""``python -m feeds.emulator``: run the exchange emulator (see :mod:`feeds.emulator.server`)."""

from feeds.emulator.server import main

if __name__ == "__main__":
    raise SystemExit(main())
