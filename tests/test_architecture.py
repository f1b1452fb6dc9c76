"""The shape of the package, read from the source with `ast` (nothing is imported):

1. no import cycle between charlm modules, lazy imports inside functions included (a module
   importing its own parent package does not count);
2. imports flow one way, down the layers of CONVENTIONS.md section 1
       entry (charlm._entry, charlm.__main__)                  5
       charlm.cli.*                                            4
       charlm (the package __init__, the library face)         3.5
       charlm.lm.*, charlm.qa.*                                3
       charlm.optim, charlm.data.*, charlm.kernels.*           2
       charlm.config, charlm.errors, charlm.runtime            1
   a module imports lower layers and its own group; at equal rank two different groups do not
   import each other (lm and qa are independent, so are data and kernels), except that
   charlm.optim stands over the kernels it calls;
   only charlm.cli imports typer or rich; numba is imported at module level only by
   charlm.kernels, charlm.lm and charlm.qa, never by data, config, errors or the face, and
   elsewhere (runtime, cli) only inside the function that needs it;
3. no function longer than MAX_FUNCTION_LINES outside charlm/kernels/ (a kernel is one loop
   nest that reads best whole);
4. no module longer than MAX_MODULE_LINES.

Every failure names the offenders with file and line. A new top-level module must be given a
layer in `layer_of` before the test passes.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "charlm"
ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / PACKAGE
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 450

# (group, rank) of each part of the package
BASE = ("config", "errors", "runtime", "dist")
PEERS = {("optim", "kernels")}  # (importer group, imported group) allowed at equal rank
CLI_ONLY = ("typer", "rich")
NUMBA_AT_MODULE_LEVEL = ("kernels", "lm", "qa")           # groups
NUMBA_NEVER = ("charlm", "charlm.data", "charlm.config", "charlm.errors")  # modules and packages


# ------------------------------------------------------------------ reading the source
@dataclass(frozen=True)
class Import:
    importer: str      # dotted module name
    target: str        # dotted name: a charlm module, or a third-party top-level package
    internal: bool     # target is a charlm module
    module_level: bool  # executed on import (not inside a function)
    where: str         # path:line

    def __str__(self):
        return f"{self.where} {self.importer} imports {self.target}"


def discover(src: Path = SRC) -> dict[str, Path]:
    """Dotted module name -> file, packages named by their folder."""
    mods = {}
    for path in sorted(src.rglob("*.py")):
        parts = path.relative_to(src.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports_of(name: str, path: Path, mods: dict[str, Path], root: Path = ROOT) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    rel = path.relative_to(root)
    found: list[Import] = []

    def add(target: str, node: ast.AST, module_level: bool):
        internal = target in mods
        if not internal and (target == PACKAGE or target.startswith(PACKAGE + ".")):
            return  # an attribute path that is not a module of its own: counted via its module
        found.append(Import(name, target if internal else target.split(".")[0], internal, module_level,
                            f"{rel}:{node.lineno}"))

    def visit(node: ast.AST, module_level: bool):
        for child in ast.iter_child_nodes(node):
            inner = module_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, child, module_level)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package
                    for _ in range(child.level - 1):
                        base = base.rpartition(".")[0]
                    base = f"{base}.{child.module}" if child.module else base
                else:
                    base = child.module
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    # `from pkg import mod` imports the module; `from pkg import Name` the package
                    add(sub if sub in mods else base, child, module_level)
            visit(child, inner)

    visit(tree, True)
    return found


def all_imports(mods: dict[str, Path]) -> list[Import]:
    return [imp for name, path in mods.items() for imp in _imports_of(name, path, mods)]


def graph(imports: list[Import], mods) -> dict[str, set[str]]:
    """charlm module -> the charlm modules it imports, its own ancestor packages left out."""
    edges = {m: set() for m in mods}
    for imp in imports:
        if imp.internal and imp.target != imp.importer and not imp.importer.startswith(imp.target + "."):
            edges[imp.importer].add(imp.target)
    return edges


# ------------------------------------------------------------------ cycles
def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one member (or a self-loop), each
    sorted: every module in one of them reaches itself through the others (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
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
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return sorted(out)


def describe_cycle(comp: list[str], imports: list[Import]) -> str:
    inside = set(comp)
    lines = [str(i) for i in imports if i.internal and i.importer in inside and i.target in inside
             and i.importer != i.target]
    return " <-> ".join(comp) + ":\n      " + "\n      ".join(dict.fromkeys(lines))


# ------------------------------------------------------------------ layers
def layer_of(module: str):
    """(group, rank) of a charlm module, or None when no layer has been decided for it."""
    parts = module.split(".")
    if module == PACKAGE:
        return ("face", 3.5)
    head = parts[1]
    if head in ("_entry", "__main__"):
        return ("entry", 5)
    if head == "cli":
        return ("cli", 4)
    if head in ("lm", "qa"):
        return (head, 3)
    if head in ("optim", "data", "kernels"):
        return (head, 2)
    if head in BASE and len(parts) == 2:
        return ("base", 1)
    return None


def layer_violation(importer: str, target: str) -> str | None:
    """Why importer may not import target (both charlm modules), or None when it may."""
    a, b = layer_of(importer), layer_of(target)
    if a is None or b is None:
        return None  # reported by test_every_module_has_a_layer
    (ga, ra), (gb, rb) = a, b
    if rb < ra or ga == gb or (ga, gb) in PEERS:
        return None
    if rb > ra:
        return f"upward: {ga} ({ra}) -> {gb} ({rb})"
    return f"sideways: {ga} and {gb} are independent layers of rank {ra}"


MODS = discover()
IMPORTS = all_imports(MODS)


def _report(what: str, offenders: list[str]) -> str:
    return f"{len(offenders)} {what}:\n  " + "\n  ".join(offenders)


# ------------------------------------------------------------------ the tests
def test_the_walk_sees_the_package():
    assert {"charlm", "charlm.cli.app", "charlm.lm.model", "charlm.kernels.lstm", "charlm.data.vocab",
            "charlm.qa.babi", "charlm.errors"} <= set(MODS)
    assert any(i.importer == "charlm.lm.model" and i.target == "charlm.kernels.lstm" for i in IMPORTS)
    assert any(i.importer == "charlm.cli.common" and i.target == "typer" for i in IMPORTS)


def test_no_import_cycles():
    cycles = find_cycles(graph(IMPORTS, MODS))
    assert not cycles, _report("import cycle(s)", [describe_cycle(c, IMPORTS) for c in cycles])


def test_every_module_has_a_layer():
    unranked = sorted(m for m in MODS if layer_of(m) is None)
    assert not unranked, _report("module(s) without a layer (give each one in layer_of)", unranked)


def test_imports_flow_down_the_layers():
    bad = []
    for imp in IMPORTS:
        if imp.internal and not imp.importer.startswith(imp.target + "."):
            why = layer_violation(imp.importer, imp.target)
            if why:
                bad.append(f"{imp} ({why})")
    assert not bad, _report("import(s) against the layers", bad)


def test_only_the_cli_imports_typer_and_rich():
    bad = [str(i) for i in IMPORTS
           if not i.internal and i.target in CLI_ONLY and (layer_of(i.importer) or ("?",))[0] != "cli"]
    assert not bad, _report("import(s) of typer/rich outside charlm.cli", bad)


def test_numba_stays_with_the_kernels_and_the_models_that_call_them():
    bad = []
    for imp in IMPORTS:
        if imp.internal or imp.target != "numba":
            continue
        group = (layer_of(imp.importer) or ("?",))[0]
        never = [p for p in NUMBA_NEVER
                 if imp.importer == p or (p != PACKAGE and imp.importer.startswith(p + "."))]
        if never:
            bad.append(f"{imp} (never in {never[0]})")
        elif imp.module_level and group not in NUMBA_AT_MODULE_LEVEL:
            bad.append(f"{imp} (at module level: import it inside the function that needs it)")
    assert not bad, _report("numba import(s) out of place", bad)


def test_functions_are_short_outside_the_kernels():
    long = []
    for name, path in MODS.items():
        if name.startswith(f"{PACKAGE}.kernels"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long, _report(f"function(s) over {MAX_FUNCTION_LINES} lines", sorted(long))


def test_modules_are_small():
    big = []
    for name, path in MODS.items():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_MODULE_LINES:
            big.append(f"{path.relative_to(ROOT)}: {n} lines")
    assert not big, _report(f"module(s) over {MAX_MODULE_LINES} lines", sorted(big))


# ------------------------------------------------------------------ the checks can fail
def test_the_cycle_finder_finds_a_planted_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"a"}, "f": {"f"}}
    assert find_cycles(edges) == [["a", "b", "c"], ["f"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) == []


def test_the_layer_rule_refuses_upward_and_sideways_imports():
    assert layer_violation("charlm.lm.train", "charlm.kernels.lstm") is None
    assert layer_violation("charlm.cli.qa", "charlm.qa.train") is None
    assert layer_violation("charlm.lm.train", "charlm.lm.model") is None
    assert layer_violation("charlm.optim", "charlm.kernels.optim") is None
    assert layer_violation("charlm.cli.app", "charlm") is None
    assert "upward" in layer_violation("charlm.lm.model", "charlm")
    assert "upward" in layer_violation("charlm.data.vocab", "charlm.lm.model")
    assert layer_violation("charlm.config", "charlm.errors") is None
    assert "sideways" in layer_violation("charlm.kernels.rnn", "charlm.optim")
    assert "sideways" in layer_violation("charlm.lm.model", "charlm.qa.model")
    assert "sideways" in layer_violation("charlm.kernels.layers", "charlm.data.vocab")
    assert "sideways" in layer_violation("charlm.kernels.optim", "charlm.optim")
    assert "upward" in layer_violation("charlm.cli.app", "charlm._entry")


@pytest.mark.parametrize("source, module_level", [("import numba\n", True),
                                                  ("def f():\n    import numba\n", False),
                                                  ("class C:\n    from numba import njit\n", True)])
def test_the_walk_tells_module_level_from_lazy_imports(tmp_path, source, module_level):
    (tmp_path / "charlm").mkdir()
    path = tmp_path / "charlm" / "m.py"
    path.write_text(source)
    (imp,) = _imports_of("charlm.m", path, {"charlm.m": path}, root=tmp_path)
    assert (imp.target, imp.internal, imp.module_level) == ("numba", False, module_level)
