"""marketflow's Faust application: ``faust -A app worker``.

The package attributes are created on first access (PEP 562), so the pure modules
(:mod:`core.models`, :mod:`core.config`, :mod:`core.errors`) import without side effects:

* ``app.settings`` — the validated :class:`core.config.Settings`; invalid configuration
  prints the problems and exits with status 2;
* ``app.app`` — the :class:`faust.App`, with every topic, table, agent, view and CLI
  command registered.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

__all__ = ["app", "settings"]


def _load_settings() -> Any:
    from core.config import load_settings
    from core.errors import ConfigError

    try:
        return load_settings()
    except ConfigError as exc:
        print(f"marketflow: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def __getattr__(name: str) -> Any:
    if name == "settings":
        value = _load_settings()
        globals()["settings"] = value
        return value
    if name == "app":
        faust_app = importlib.import_module("app.faust_app").app
        globals()["app"] = faust_app
        for mod in ("agents", "views", "app.commands", "app.history_commands"):
            importlib.import_module(mod)
        return faust_app
    raise AttributeError(f"module 'app' has no attribute {name!r}")
