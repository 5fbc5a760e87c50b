"""Import graph between smallshot's packages and modules, from `ast` (no code is run).

    python benchmarks/import_graph.py [ROOT]   -> package edges, module cycles, ray importers
"""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGES = ("launch", "commands", "cluster", "trainers", "augment")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, mod: str, mods: frozenset = frozenset()) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            subs = {f"{base}.{a.name}" for a in node.names}
            # `from pkg import module` imports the module, not the package's __init__
            out |= subs if subs <= mods else {base} | subs
    return out


def graph(root: Path) -> dict[str, set[str]]:
    files = [root / "launch.py", *[p for pkg in PACKAGES[1:] for p in (root / pkg).rglob("*.py")]]
    mods = {module_name(root, p): p for p in files if p.exists()}
    g: dict[str, set[str]] = {}
    for mod, path in mods.items():
        names = imports_of(path, mod, frozenset(mods))
        g[mod] = {m for m in names if m in mods and m != mod}
        g[mod] |= {"ray"} if any(i == "ray" or i.startswith("ray.") for i in names) else set()
    return g


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
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
                out.append(sorted(comp))
    sys.setrecursionlimit(10000)
    for v in g:
        if v not in index:
            visit(v)
    return out


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else ".").resolve()
    g = graph(root)
    top = lambda m: m.split(".")[0]
    pkg_edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for a, bs in g.items():
        for b in bs:
            if b != "ray" and top(a) != top(b):
                pkg_edges[(top(a), top(b))].append(f"{a} -> {b}")
    print("package edges (importer -> imported: count, examples)")
    for (a, b), ex in sorted(pkg_edges.items()):
        print(f"  {a} -> {b}: {len(ex)}  e.g. {', '.join(sorted(ex)[:3])}")
    pcy = cycles({p: {b for (a, b) in pkg_edges if a == p} for p in {a for a, _ in pkg_edges}})
    print(f"package cycles: {pcy or 'none'}")
    mcy = cycles(g)
    print(f"module cycles: {len(mcy)}")
    for c in mcy:
        print(f"  {' <-> '.join(c)}")
    ray = sorted(m for m, bs in g.items() if "ray" in bs)
    print(f"modules importing ray: {', '.join(ray)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
