"""marketflow's Faust application: ``faust -A app worker``.

Importing this package loads the settings (exit status 2 with a message when they are
invalid), creates the :class:`faust.App` and registers topics, tables, agents, views
and commands.
"""

from __future__ import annotations

import sys

from app.errors import ConfigError
from app.settings import Settings, load_settings

__all__ = ["app", "settings"]

try:
    settings: Settings = load_settings()
except ConfigError as _exc:
    print(f"marketflow: {_exc}", file=sys.stderr)
    raise SystemExit(2) from None

from app.faust_app import app  # noqa: E402

# Registration side effects: topics, tables, agents, views and CLI commands.
import agents  # noqa: E402,F401
import app.commands  # noqa: E402,F401
import views  # noqa: E402,F401
