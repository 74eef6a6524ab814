"""The package shows the architecture: data flows one way, and nothing imports in a circle.

Layers, lowest first; a package may import its own modules and lower layers only:

    errors, spec            the error tree and the job spec (spec/: JobSpec, parts, engine:)
    api                     request kinds, providers, result records, HTTP, retry, tokens
    io                      storage, input shards, results, fingerprint, summary
    sim                     the simulated provider (speaks the api's protocols)
    money                   prices, ledger, budget gate, estimate
    limits                  slot arithmetic, the limiter actor, permits
    engine                  self-hosted servers: replicas, routing, GPU time
    online, batch           the two ways a job is sent
    runner                  one job: prepare, run a mode, summarize
    ops, schedule           submit/status on a cluster, nightly runs
    public, ray_data        the Python API (batchrun.run ...) and the Ray Data operator
    cli                     the command line

commcheck is independent: it imports nothing else of batchrun.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "batchrun"
LAYERS = [{"errors"}, {"spec"}, {"api"}, {"io"}, {"sim"}, {"money"},
          {"limits"}, {"engine"}, {"online", "batch"}, {"runner"}, {"ops", "schedule"},
          {"public", "ray_data"}, {"cli"}, {"__main__"}]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}
MAX_MODULE_LINES = 420


def _module(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "batchrun"


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """batchrun modules imported by ``path`` (TYPE_CHECKING blocks never count)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            skip.update(id(n) for n in ast.walk(node))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("batchrun"))
        elif (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
              and node.module.startswith("batchrun")):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _graph(*, top_level_only: bool) -> dict[str, set[str]]:
    modules = {_module(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for target in _imports(path, top_level_only=top_level_only):
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]  # `from pkg import name`: the module
            if target in modules and target != name:
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    # every import counts, lazy ones too: a function-level import is no excuse for a circle
    # (package __init__ modules that re-export their own package are not a circle)
    graph = _graph(top_level_only=False)
    for name in list(graph):
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    assert _cycles(graph) == []


def test_packages_import_only_lower_layers():
    wrong = []
    for name, targets in _graph(top_level_only=False).items():
        src = _package(name)
        for target in targets:
            dst = _package(target)
            if src == dst or dst == "batchrun":  # the top-level package itself
                continue
            if src == "commcheck" or dst == "commcheck":
                # the CLI mounts commcheck, an engine's preflight runs its GPU checks;
                # nothing else touches it
                if src not in ("cli", "engine") or dst != "commcheck":
                    wrong.append(f"{name} -> {target}")
                continue
            if LEVEL[dst] >= LEVEL[src]:
                wrong.append(f"{name} -> {target}")
    assert wrong == []


def test_modules_stay_small():
    big = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert big == {}


def test_every_package_module_declares_its_public_names():
    missing = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py")
               and "__all__" not in p.read_text()]
    assert missing == []
