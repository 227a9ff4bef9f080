"""The layout of parity/ (parity/README.md): imports run one way, no cycles, short files.

    cli -> commands -> {case, sides, judge, report} -> {errors, fileio, facts, numfmt}
    workers -> {workers, case, errors, fileio, facts, numfmt}      (apart from the runner side)

Pure Python: every file of parity/ is parsed with ``ast``, nothing is imported.
"""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARITY = os.path.join(REPO, "parity")
MAX_LINES = 400

BOTTOM = {"errors", "fileio", "facts", "numfmt"}
MIDDLE = {"case", "sides", "judge", "report"}
# what each part may import (besides itself and the standard library / third parties)
ALLOWED = {
    "__main__": {"cli"},
    "__init__": set(),
    "cli": {"commands"} | MIDDLE | BOTTOM,
    "commands": MIDDLE | BOTTOM,
    "workers": {"case"} | BOTTOM,
    **{m: set(BOTTOM) for m in MIDDLE},
    **{b: set(BOTTOM) for b in BOTTOM},
}
LAZY_MARK = "lazy:"     # a function-level parity import must say why it is not at the top


def _files():
    for root, _, names in os.walk(PARITY):
        for n in sorted(names):
            if n.endswith(".py"):
                yield os.path.join(root, n)


def _module(path):
    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _part(module):
    """The part of parity a module belongs to: its package, or its own name at the top."""
    bits = module.split(".")
    return bits[1] if len(bits) > 1 else "__init__"


def _imports(path):
    """(module imported, line, at top level?, line text) for every parity import of a file."""
    src = open(path, encoding="utf-8").read()
    tree = ast.parse(src)
    lines = src.splitlines()
    top = set(id(n) for n in tree.body)
    me = _module(path)
    pkg = me if path.endswith("__init__.py") else me.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod + "." + a.name for a in node.names]      # resolved to the module by _resolve
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if t == "parity" or t.startswith("parity."):
                text = " ".join(lines[node.lineno - 2: node.end_lineno])
                out.append((t, node.lineno, id(node) in top, text))
    return out


def _resolve(target, modules):
    """The parity module a dotted import target names (``parity.judge.compare.judge_tensor`` ->
    ``parity.judge.compare``)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target


def test_no_file_over_400_lines():
    long = []
    for f in _files():
        n = sum(1 for _ in open(f, encoding="utf-8"))
        if n > MAX_LINES:
            long.append(f"{os.path.relpath(f, REPO)}: {n} lines")
    assert not long, "files over 400 lines:\n" + "\n".join(long)


def test_imports_run_one_way():
    modules = {_module(f) for f in _files()}
    bad = []
    for f in _files():
        me = _module(f)
        part = _part(me)
        if part not in ALLOWED:
            bad.append(f"{os.path.relpath(f, REPO)}: not in a known part of parity/ (see parity/README.md)")
            continue
        for target, line, _, _ in _imports(f):
            mod = _resolve(target, modules)
            if not mod:
                bad.append(f"{os.path.relpath(f, REPO)}:{line}: {target} is not a parity module")
                continue
            other = _part(mod)
            if other != part and other not in ALLOWED[part]:
                bad.append(f"{os.path.relpath(f, REPO)}:{line}: {part} may not import {other} ({mod})")
    assert not bad, "\n".join(bad)


def test_sibling_imports_at_the_top():
    """An import inside a function hides a cycle; the only reason allowed is not loading a
    framework, and then the line says so (``# lazy: ...``)."""
    bad = []
    for f in _files():
        for target, line, top, text in _imports(f):
            if not top and LAZY_MARK not in text:
                bad.append(f"{os.path.relpath(f, REPO)}:{line}: {target} imported inside a function")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    modules = {_module(f) for f in _files()}
    graph = {m: set() for m in modules}
    for f in _files():
        for target, _, _, _ in _imports(f):
            mod = _resolve(target, modules)
            # a package's __init__ is imported on the way to its modules: not an edge of its own
            if mod and mod != _module(f):
                graph[_module(f)].add(mod)
    # Tarjan's strongly connected components
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    assert not sccs, "import cycles: " + "; ".join(" <-> ".join(c) for c in sccs)


@pytest.mark.parametrize("part", sorted(MIDDLE | {"cli", "commands", "workers"}))
def test_every_part_is_a_package(part):
    assert os.path.isfile(os.path.join(PARITY, part, "__init__.py"))
