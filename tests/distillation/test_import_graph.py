"""Import hygiene of keras_lopt.layers, .ops, .models and .distillation.

The import graph is read from the source with `ast` (every `import` and
`from` statement, function-local ones included, since those are how cycles
used to hide), and must have no cycle. At module level these packages may
import only keras, numpy, the standard library and keras_lopt itself, so that
`import keras_lopt` works with keras + numpy alone.

Run as a script for a report: `python -m tests.distillation.test_import_graph`.
"""

import ast
import os
import sys

# Not tests.conftest's: that imports keras, and the report needs no backend.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PACKAGES = ("keras_lopt.layers", "keras_lopt.ops", "keras_lopt.models", "keras_lopt.distillation")
BACKENDS = ("jax", "jaxlib", "tensorflow", "torch")


def _module_name(path):
    rel = os.path.relpath(path, REPO_ROOT)[: -len(".py")].split(os.sep)
    if rel[-1] == "__init__":
        rel = rel[:-1]
    return ".".join(rel)


def _modules():
    found = {}
    for package in PACKAGES:
        root = os.path.join(REPO_ROOT, *package.split("."))
        for folder, _, files in os.walk(root):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    found[_module_name(path)] = path
    return found


def _imports(module, path, is_package, modules):
    """`(imported module, line, at module level)` for every import in the file."""
    tree = ast.parse(open(path).read(), path)
    top_level = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                parts = parts if is_package else parts[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            # `from pkg import name` depends on the submodule `pkg.name` when
            # there is one, else on `pkg` itself.
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub if sub in modules else base, node.lineno, id(node) in top_level))
    return out


def import_graph():
    modules = _modules()
    graph, external = {}, {}
    for module, path in modules.items():
        edges = set()
        for name, line, top in _imports(module, path, path.endswith("__init__.py"), modules):
            if name in modules and name != module:
                edges.add(name)
            elif top:
                external.setdefault(module, set()).add((name.split(".")[0], line))
        graph[module] = edges
    return graph, external


def cycles(graph):
    """Every elementary cycle's node list, found by depth-first search (small graphs)."""
    found, seen = [], set()

    def visit(node, stack):
        for nxt in sorted(graph[node]):
            if nxt in stack:
                cycle = stack[stack.index(nxt):]
                key = frozenset(cycle)
                if key not in seen:
                    seen.add(key)
                    found.append(cycle + [nxt])
            elif len(stack) < 12:
                visit(nxt, stack + [nxt])

    for start in sorted(graph):
        visit(start, [start])
    return found


def test_no_import_cycles():
    graph, _ = import_graph()
    assert len(graph) > 10
    assert cycles(graph) == []


def test_no_backend_imported_at_module_level():
    _, external = import_graph()
    bad = {m: sorted(n for n in names if n[0] in BACKENDS) for m, names in external.items()}
    assert {m: n for m, n in bad.items() if n} == {}


def main():
    graph, external = import_graph()
    print(f"{len(graph)} modules, {sum(len(e) for e in graph.values())} internal import edges")
    for module in sorted(graph):
        print(f"  {module} -> {', '.join(sorted(graph[module])) or '-'}")
    found = cycles(graph)
    print(f"cycles: {len(found)}")
    for cycle in found:
        print("  " + " -> ".join(cycle))
    third_party = sorted({n for names in external.values() for n, _ in names})
    print("module-level imports outside keras_lopt:", ", ".join(third_party))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
