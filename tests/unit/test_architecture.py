"""The package map of ``docs/architecture.md`` holds: layers, no cycles, no work at import.

* Every package imports only packages of a lower layer (:data:`LAYERS`), and the
  sub-packages of ``feeds/`` only those below them (:data:`FEEDS_LAYERS`).
* No module imports one of our modules inside a function (the way cycles get hidden), and
  the module graph has no cycle.
* Importing every module, in a fresh interpreter with no configuration file and no
  service reachable, loads no settings and builds no app, client, pool or service.
"""

from __future__ import annotations

import ast
import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: package -> layer; a package may import only packages of a strictly lower layer
LAYERS = {"core": 0, "sql": 1, "tables": 1, "stores": 1, "feeds": 2, "query": 3,
          "agents": 4, "views": 5, "app": 6}
#: the same inside ``feeds/``: the emulator (a tool) sits on top of the live feeds
FEEDS_LAYERS = {"live": 0, "replay": 0, "history": 0, "emulator": 1}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in LAYERS:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, bool]]:
    """``(imported module, inside a function)`` for every import of one of our packages."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                base = child.module
                # ``from pkg import module`` imports the module pkg.module
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                         for a in child.names]
            else:
                visit(child, nested)
                continue
            found.extend((n, nested) for n in names if n.split(".")[0] in LAYERS)

    visit(tree, False)
    return found


def _package(module: str) -> tuple[str, str | None]:
    parts = module.split(".")
    sub = parts[1] if parts[0] == "feeds" and len(parts) > 1 else None
    return parts[0], sub


def test_the_map_covers_every_package() -> None:
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench"}
    assert on_disk == set(LAYERS)
    subs = {p.parent.name for p in (ROOT / "feeds").glob("*/__init__.py")}
    assert subs == set(FEEDS_LAYERS)


def test_packages_import_only_lower_layers() -> None:
    bad = []
    for mod, path in MODULES.items():
        pkg, sub = _package(mod)
        for target, _ in _imports(path):
            tpkg, tsub = _package(target)
            if tpkg == pkg:
                if pkg == "feeds" and sub and tsub and sub != tsub and not (
                        FEEDS_LAYERS[tsub] < FEEDS_LAYERS[sub]):
                    bad.append(f"{mod} -> {target}")
                if pkg == "feeds" and sub and tsub is None and target != "feeds":
                    bad.append(f"{mod} -> {target}")
                continue
            if not LAYERS[tpkg] < LAYERS[pkg]:
                bad.append(f"{mod} -> {target}")
    assert bad == []


def test_no_import_inside_a_function() -> None:
    bad = [f"{mod} -> {target}" for mod, path in MODULES.items()
           for target, nested in _imports(path) if nested]
    assert bad == []


def test_no_module_cycle() -> None:
    graph = {mod: {t for t, _ in _imports(path) if t in MODULES and t != mod}
             for mod, path in MODULES.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            strongconnect(v)
    assert cycles == []


_PROBE = """
import gc, sys, threading
import core.config

def refuse(*a, **k):
    raise AssertionError("settings loaded at import")

core.config.load_settings = refuse
modules = sys.argv[1:]
for name in modules:
    __import__(name)

import asyncpg, faust, mode, redis.asyncio
built = [type(o).__name__ for o in gc.get_objects()
         if isinstance(o, (faust.App, mode.Service, redis.asyncio.Redis, asyncpg.Pool))]
assert built == [], built
assert threading.active_count() == 1, threading.enumerate()
import app
assert "app" not in vars(app), "the Faust app was built at import"
print(len(modules))
"""


def test_importing_every_module_builds_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MARKETFLOW_", "FAUST"))}
    env["PYTHONPATH"] = str(ROOT)
    mods = [m for m in MODULES if m != "feeds.emulator.__main__"]
    proc = subprocess.run([sys.executable, "-c", _PROBE, *mods], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(len(mods))


@pytest.mark.parametrize("mod", ["feeds.emulator"])
def test_the_emulator_is_outside_the_worker_graph(mod: str) -> None:
    users = [m for m, path in MODULES.items() if not m.startswith(mod)
             for t, _ in _imports(path) if t.startswith(mod)]
    assert users == []


def test_every_package_is_installed_type_checked_and_in_the_image() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    included = set(cfg["options.packages.find"]["include"].split())
    assert {p for pkg in LAYERS for p in (pkg, f"{pkg}.*")} <= included
    assert set(cfg["mypy"]["packages"].split(",")) == set(LAYERS)
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert [p for p in LAYERS if f"COPY {p}/ {p}/" not in dockerfile] == []
