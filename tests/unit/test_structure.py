"""The shape of the Python side (docs/architecture.md, "Layers"): read from
the source with ast, nothing imported, no root or BPF needed.

- No import cycle between modules of controller/, cli/ and bench/, counting
  the imports inside functions too (they only hide a cycle, they do not
  remove it).
- Imports point down the layers only: a module imports from its own package
  or from a lower layer, never from a higher one or from a peer of its rank.
- The product (controller/, cli/) never imports the development tools
  (xknock_dev/), the tests or the benchmarks.
"""

import ast
import os

import pytest
from repo_paths import REPO


# Where each tree is imported from: directory -> dotted prefix.
TREES = {"controller": "xknock.controller", "cli": "xknock.cli", "bench": "bench"}

# Lowest first. A module may import from its own package and from packages of
# lower ranks; packages of one rank (client, importers) know nothing of each
# other. bench/ is no layer: it may import anything but the tests.
LAYERS = (
    ("xknock.controller", "xknock.controller.errors"),   # the package itself and the one exception everyone raises
    ("xknock.controller.kernel",),      # libbpf, the ctypes mirror, typed maps, build/load/attach, pins, clock, lock
    ("xknock.controller.wire",),        # fwknop's SPA message and key files (pure)
    ("xknock.controller.config",),      # the TOML config: model, field parsers, loading
    ("xknock.controller.policy",),      # config -> policy banks; time-based sequences
    ("xknock.controller.state",),       # grants, bans, sessions, status of a running filter
    ("xknock.controller.spa",),         # the SPA verifier, receiver and replay cache
    ("xknock.controller.client", "xknock.controller.importers"),
    ("xknock.controller.cluster",),     # etcd: grants, SPA replay claims and bans shared between nodes
    ("xknock.controller.daemon",),      # attach/detach, the loop, events, hooks, sdnotify, metrics
    ("xknock.cli",),                    # the command line
)
PRODUCT = ("xknock.controller", "xknock.cli")
DEV = ("xknock_dev", "bench")   # plus every module of tests/, found on disk


def tree_sources():
    """{module name: source} of every module of controller/, cli/ and bench/."""
    sources = {}
    for directory, prefix in TREES.items():
        root = os.path.join(REPO, directory)
        for dirpath, _, filenames in os.walk(root):
            for filename in filenames:
                if not filename.endswith(".py"):
                    continue
                parts = os.path.relpath(os.path.join(dirpath, filename[:-3]), root).split(os.sep)
                is_package = parts[-1] == "__init__"
                name = ".".join([prefix, *parts[:-1]] if is_package else [prefix, *parts])
                with open(os.path.join(dirpath, filename)) as f:
                    sources[name] = (f.read(), is_package)
    return sources


def modules_of_tests():
    """The names of the modules of tests/ and its folders (each folder is on sys.path)."""
    return {name[:-3] for _, _, names in os.walk(os.path.join(REPO, "tests")) for name in names if name.endswith(".py")}


def imports_of(name, source, is_package):
    """[(line, imported name)] of every import in a module, inside functions too,
    relative ones made absolute. `from X import y` yields X.y (a submodule, or a
    name of X: modules_named() tells which)."""
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source, filename=name)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: -(node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def resolve(imported, modules):
    """The module of ours an imported name lives in (longest match), or None."""
    while imported:
        if imported in modules:
            return imported
        imported = imported.rpartition(".")[0]
    return None


def graph(sources):
    """{module: {imported module: first line}} over our modules, and
    [(module, line, name)] of every import at all (for the checks on names)."""
    edges, raw = {}, []
    for name, (source, is_package) in sources.items():
        edges[name] = {}
        for line, imported in imports_of(name, source, is_package):
            raw.append((name, line, imported))
            target = resolve(imported, sources)
            if target is not None and target != name:
                edges[name].setdefault(target, line)
    return edges, raw


def cycles(edges):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in edges.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def cycle_report(edges, component):
    members = set(component)
    return "; ".join(f"{a} -> {b} (line {line})" for a in component
                     for b, line in sorted(edges[a].items()) if b in members)


# Named modules, not packages: a module put straight into controller/ is in no layer.
WHOLE = {"xknock.controller", "xknock.controller.errors"}


def layer_of(module):
    """(rank, package) of a product module by its longest package prefix, or None."""
    best = None
    for rank, packages in enumerate(LAYERS):
        for package in packages:
            if module == package or package not in WHOLE and module.startswith(package + "."):
                if best is None or len(package) > len(best[1]):
                    best = (rank, package)
    return best


def layer_violations(edges):
    found = []
    for module, targets in sorted(edges.items()):
        mine = layer_of(module)
        if mine is None:
            continue
        for target, line in sorted(targets.items()):
            theirs = layer_of(target)
            if theirs is None or theirs[1] == mine[1]:
                continue
            if theirs[0] >= mine[0]:
                found.append(f"{module} (line {line}) imports {target}: {theirs[1]} is "
                             f"{'a peer of' if theirs[0] == mine[0] else 'above'} {mine[1]}")
    return found


def dev_imports(raw, tests):
    found = []
    for module, line, imported in raw:
        top = imported.split(".")[0]
        if module.startswith(PRODUCT) and (top in DEV or top in tests or top == "tests"):
            found.append(f"{module} (line {line}) imports {imported}: the product never imports development tools")
        if module.startswith("bench") and (top in tests or top == "tests"):
            found.append(f"{module} (line {line}) imports {imported}: benchmarks take fixtures from xknock_dev, not tests/")
    return found


def unknown_imports(raw, sources):
    """Imports of xknock.controller.X / xknock.cli.X where X is no module of
    ours: a stale name here would also hide an edge from the other checks."""
    found = []
    for module, line, imported in raw:
        if imported.startswith(tuple(p + "." for p in PRODUCT)) and resolve(imported, sources) in PRODUCT:
            found.append(f"{module} (line {line}): {imported} is no module")
    return found


# --- the real tree -------------------------------------------------------------

@pytest.fixture(scope="module")
def real():
    sources = tree_sources()
    edges, raw = graph(sources)
    return sources, edges, raw


def test_the_tree_is_read(real):
    sources, edges, _ = real
    # A sanity check on the reader itself: these exist and import what they do.
    assert "xknock.controller.kernel.maps" in sources and "xknock.cli.main" in sources and "bench.datapath" in sources
    assert "xknock.controller.kernel.bpfsys" in edges["xknock.controller.kernel.maps"]


def test_every_product_module_is_in_a_layer(real):
    sources, _, _ = real
    homeless = [name for name in sorted(sources) if name.startswith(PRODUCT) and not layer_of(name)]
    assert not homeless, (f"{', '.join(homeless)}: in no layer; move each into the package of its layer "
                          "(docs/architecture.md, Layers), or add a layer to LAYERS")


def test_no_import_cycles(real):
    _, edges, _ = real
    found = cycles(edges)
    assert not found, "import cycles: " + " | ".join(cycle_report(edges, c) for c in found)


def test_imports_point_down_the_layers(real):
    _, edges, _ = real
    found = layer_violations(edges)
    assert not found, "\n".join(found)


def test_the_product_imports_no_development_tools(real):
    _, _, raw = real
    found = dev_imports(raw, modules_of_tests())
    assert not found, "\n".join(found)


def test_every_product_import_names_a_module(real):
    sources, _, raw = real
    found = unknown_imports(raw, sources)
    assert not found, "\n".join(found)


# --- the checks can fail -------------------------------------------------------

def synthetic(modules):
    return graph({name: (text, False) for name, text in modules.items()})


def test_a_cycle_through_a_function_level_import_is_found():
    edges, _ = synthetic({
        "xknock.controller.kernel.a": "from . import b\n",
        "xknock.controller.kernel.b": "from .c import thing\n",
        "xknock.controller.kernel.c": "def late():\n    from xknock.controller.kernel.a import x\n    return x\n",
    })
    assert cycles(edges) == [["xknock.controller.kernel.a", "xknock.controller.kernel.b", "xknock.controller.kernel.c"]]


def test_an_import_up_the_layers_is_found():
    edges, _ = synthetic({
        "xknock.controller.kernel.maps": "def f():\n    from ..state import grants\n",
        "xknock.controller.state.grants": "from ..kernel import maps\n",
    })
    found = layer_violations(edges)
    assert len(found) == 1 and found[0].startswith("xknock.controller.kernel.maps (line 2) imports "
                                                   "xknock.controller.state.grants")
    assert cycles(edges)   # and the two form a cycle


def test_a_module_straight_in_controller_is_in_no_layer():
    assert layer_of("xknock.controller.answers") is None
    assert layer_of("xknock.controller.errors") == (0, "xknock.controller.errors")
    assert layer_of("xknock.controller.kernel.maps") == (1, "xknock.controller.kernel")


def test_a_peer_import_is_found():
    edges, _ = synthetic({
        "xknock.controller.client.knockclient": "from ..importers.knockd_import import convert\n",
        "xknock.controller.importers.knockd_import": "",
    })
    assert "a peer of" in layer_violations(edges)[0]


def test_a_development_import_from_the_product_is_found():
    _, raw = synthetic({
        "xknock.controller.daemon.daemon": "import xknock_dev.lab\n",
        "xknock.cli.main": "def f():\n    from e2e import x\n",
        "bench.flood": "from conftest import EXAMPLE_CONFIG\nfrom xknock_dev.e2e import xknock\n",
    })
    found = dev_imports(raw, {"conftest", "e2e"})
    assert [line.split(" ")[0] for line in found] == ["xknock.controller.daemon.daemon", "xknock.cli.main", "bench.flood"]


# --- the folders of tests/ -------------------------------------------------------

def test_every_test_file_is_in_the_folder_of_what_it_needs():
    from xknock_dev.classify_tests import misplaced

    wrong = misplaced()
    assert not wrong, "\n".join(f"tests/{path} belongs in tests/{folder}/ ({why}): "
                                "python -m xknock_dev.classify_tests --move" for path, folder, why in wrong)


def test_the_classifier_tells_the_three_folders_apart():
    from xknock_dev.classify_tests import classify

    # Written in pieces, so that this file does not read as needing a lab or the harness itself.
    assert classify("def test_a(net):\n    with served_la" + "b('x', 22) as built:\n        pass\n")[0] == "e2e"
    fixture = "x" + "k"
    assert classify(f"def test_a({fixture}):\n    pass\n")[0] == "kernel"
    assert classify("from xknock.controller.kernel import bpfsys\n")[0] == "kernel"
    assert classify("from xknock.controller.kernel import layout\ndef test_a():\n    pass\n")[0] == "unit"
