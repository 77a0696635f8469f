"""marketflow's Faust application: ``faust -A app worker``.

``app.app`` is built on first access (PEP 562) by :func:`app.factory.create_app` from
:func:`core.config.load_settings`; importing this package, or any module of the project,
builds and starts nothing. Invalid configuration prints the problems and exits with
status 2.

Owns the composition root (:mod:`app.factory`), the app class (:mod:`app.faust_app`) and the
CLI commands (:mod:`app.commands`). May import every other package; none imports it.
Layer 6, the top, of ``docs/architecture.md``.
"""

from __future__ import annotations

import sys
from typing import Any

from app.factory import create_app
from core.config import load_settings
from core.errors import ConfigError

__all__ = ["app", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "app":
        try:  # settings, and the files they name (TLS certificate, JWT keys)
            built = create_app(load_settings())
        except ConfigError as exc:
            print(f"marketflow: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        globals()["app"] = built
        return built
    raise AttributeError(f"module 'app' has no attribute {name!r}")
