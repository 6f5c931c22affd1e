"""The import graph: layers only point down, no cycles, no imports hidden inside functions.

Layers, bottom to top: utils/ < configs/, models/, flow_matching.py, optimizers/ < rebuild.py <
data/ < evaluation/ < training/ < the entry scripts and benchmarks/. A module may import its own
package and any lower layer; packages of one layer do not import each other.
"""

import ast
import os

from tests.conftest import ROOT

LAYERS = {"utils": 0, "configs": 1, "models": 1, "flow_matching": 1, "optimizers": 1, "rebuild": 2,
          "data": 3, "evaluation": 4, "training": 5}
TOP = 6  # entry scripts and benchmarks/
SKIPPED = {"tests", os.path.join("benchmarks", "runs")}


def modules():
    """{module name: path} of the repo's code (tests excluded). Hidden folders and a virtual
    environment made inside the checkout (`python -m venv venv`: a folder with a pyvenv.cfg,
    which pytest skips too) are not repo code."""
    found = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and not os.path.isfile(os.path.join(folder, d, "pyvenv.cfg"))
                         and os.path.relpath(os.path.join(folder, d), ROOT) not in SKIPPED)
        for path in (os.path.join(folder, f) for f in files if f.endswith(".py")):
            rel = os.path.relpath(path, ROOT)
            name = rel[:-3].replace(os.sep, ".")
            found[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return found


def imports(path, names):
    """[(imported repo module, line, inside a function or class)] of one file."""
    out = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            if target in names:
                out.append((target, node.lineno, node.col_offset > 0))
    return out


def layer(module):
    return LAYERS.get(module.split(".")[0], TOP)


def graph():
    names = modules()
    return names, {m: imports(p, names) for m, p in names.items()}


def test_imports_point_down_and_sit_at_the_top_of_the_file():
    names, edges = graph()
    bad = []
    for module, targets in edges.items():
        for target, line, nested in targets:
            own, other = module.split(".")[0], target.split(".")[0]
            if nested:
                bad.append(f"{module}:{line} imports {target} inside a function")
            elif layer(target) > layer(module):
                bad.append(f"{module}:{line} imports {target}, a layer above it")
            elif layer(target) == layer(module) and own != other and layer(module) != TOP:
                bad.append(f"{module}:{line} imports {target} sideways")
            elif layer(module) == TOP and layer(target) == TOP and own != other:
                bad.append(f"{module}:{line} imports another entry point, {target}")
    assert not bad, "\n".join(bad)


def test_no_relative_imports():
    """The layer check reads absolute imports only: a relative one would pass it unseen."""
    relative = [f"{module}:{node.lineno}" for module, path in modules().items()
                for node in ast.walk(ast.parse(open(path).read()))
                if isinstance(node, ast.ImportFrom) and node.level > 0]
    assert not relative, relative


def test_no_import_cycles():
    names, edges = graph()
    state, stack, cycles = {}, [], []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target, _, _ in edges[module]:
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(names):
        if module not in state:
            visit(module)
    assert not cycles, "\n".join(cycles)
