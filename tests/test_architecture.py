"""The layering of bmd_d2 (docs/ARCHITECTURE.md), checked on the source: import-linter's contracts in .importlinter,
and no import cycle between any two modules (grimp's import graph, imports inside functions included)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("importlinter", reason="import-linter is a test dependency (setup.py)")
grimp = pytest.importorskip("grimp")


def test_import_linter_contracts_hold():
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='.importlinter', no_cache=True, no_logo=True))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[out.find("Broken contracts"):] if "Broken contracts" in out else out
    assert "BROKEN" not in out and "Contracts: 2 kept, 0 broken." in out


def _cycles(edges):
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative).

    Args:
        edges: module → the set of modules it imports directly.
    """
    index, low, on_stack, stack, comps = {}, {}, set(), [], []
    counter = [0]
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    comps.append(sorted(comp))
    return comps


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "d": {"a"}}) == []


def test_no_import_cycles_between_modules():
    sys.path.insert(0, ROOT)
    try:
        graph = grimp.build_graph("bmd_d2", cache_dir=None)
    finally:
        sys.path.remove(ROOT)
    # a package's __init__ re-exporting its own submodules is not a cycle of the code: leave package inits out
    modules = {m for m in graph.modules if os.path.basename(_file_of(m)) != "__init__.py"}
    edges = {m: set(graph.find_modules_directly_imported_by(m)) & modules for m in modules}
    assert modules and _cycles(edges) == []


def _file_of(module: str) -> str:
    rel = module.replace(".", os.sep)
    return os.path.join(rel, "__init__.py") if os.path.isdir(os.path.join(ROOT, rel)) else rel + ".py"
