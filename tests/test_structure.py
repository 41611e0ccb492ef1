"""The package's import structure, read statically with `ast` (nothing is imported or run).

Two rules of issue 15: no import cycle among mmtag's modules, and no module uses another
module's private name. An import inside a function counts like one at the top: a lazy import
hides a cycle from the interpreter, not from the design (the two modules still cannot be
understood, tested or moved apart).

So does an import by string. A registry's built-ins are declared in `registries.py` as
"mmtag.heads.single:ImageHead" and imported when an entry is first looked up; the module that
looks one up (`HEADS[name]`, `.get`, `.items()`, `.values()`) imports every module its registry
names. Reading the names (`in`, iterating, `lister`, `meta`) imports nothing, which is what lets
`--help` and a config check run without torch.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "mmtag"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE

# Edges (importer, imported) tolerated, each saying why and what would remove it. Empty since the
# config reads the registries through `mmtag.registries` instead of importing their modules.
KNOWN_CYCLE_EDGES: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    imported: str  # dotted name of an mmtag module (or package)
    names: tuple[str, ...]  # names taken from it (`from .x import a, b`); empty for a module
    bound: str | None  # the local name bound to the imported module (`from . import x as y`: y)
    line: int


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _ours(module: str) -> bool:
    return module == PACKAGE or module.startswith(PACKAGE + ".")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module `from <node.module>` refers to, relative imports included."""
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]  # a package's `.` is itself; a module's, its parent
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(importer: str, tree: ast.Module, known: set[str], *,
               is_package: bool = False) -> list[Import]:
    """Every import of an mmtag module in `tree`, at any depth (functions, methods, branches)."""
    out: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            # `import mmtag.x` binds `mmtag`; only `import mmtag.x as y` binds the module itself.
            out += [Import(importer, a.name, (), a.asname, node.lineno)
                    for a in node.names if _ours(a.name)]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(importer, is_package, node)
            if not _ours(target):
                continue
            names = []
            for a in node.names:
                if f"{target}.{a.name}" in known:  # `from . import rundir`: a module
                    out.append(Import(importer, f"{target}.{a.name}", (), a.asname or a.name,
                                      node.lineno))
                else:  # `from .io import atomic_path`: a name
                    names.append(a.name)
            if names:
                out.append(Import(importer, target, tuple(names), None, node.lineno))
    return out


def private_uses(importer: str, tree: ast.Module, imports: list[Import]) -> list[str]:
    """`from .x import _y`, and `x._y` on a name bound to another mmtag module: both reach in."""
    found = [f"{importer}:{imp.line} imports {imp.imported}.{n}" for imp in imports
             if imp.imported != importer for n in imp.names if _private(n)]
    bound = {imp.bound: imp.imported for imp in imports
             if imp.bound is not None and imp.imported != importer}
    found += [f"{importer}:{node.lineno} uses {bound[node.value.id]}.{node.attr}"
              for node in ast.walk(tree)
              if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id in bound and _private(node.attr)]
    return found


def parsed() -> dict[str, tuple[ast.Module, list[Import]]]:
    mods = modules()
    out = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        out[name] = tree, imports_of(name, tree, set(mods), is_package=path.name == "__init__.py")
    return out


# --------------------------------------------------------------------- imports by string
REGISTRIES = f"{PACKAGE}.registries"
RESOLVING = {"get", "items", "values", "pop", "setdefault"}  # methods that load entries


def lazy_tables(tree: ast.Module, known: set[str]) -> dict[str, tuple[str, set[str]]]:
    """`TABLE = Registry("what", {name: "mmtag.x.y:attr", ...})` of registries.py: table name ->
    (what, the mmtag modules its entries name)."""
    tables = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Name) and node.value.func.id == "Registry"):
            what = node.value.args[0].value
            targets = {c.value.partition(":")[0] for c in ast.walk(node.value)
                       if isinstance(c, ast.Constant) and isinstance(c.value, str)}
            for t in node.targets:
                tables[t.id] = (what, {m for m in targets if m in known})
    return tables


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _resolves(node: ast.AST, parent: ast.AST | None) -> bool:
    """Whether the registry expression `node` is used to load entries (not only its names)."""
    if isinstance(parent, ast.Subscript) and parent.value is node:
        return isinstance(parent.ctx, ast.Load)
    return isinstance(parent, ast.Attribute) and parent.attr in RESOLVING


def string_imports(trees: dict[str, tuple[ast.Module, list[Import]]]) -> dict[str, set[str]]:
    """module -> the modules it imports by looking up lazy registry entries. A registry is
    reached as `registries.TABLE`, `registries.registry("what")`, or a name bound to either at
    a module's top (`HEADS = registries.HEADS`) and imported from there."""
    tables = lazy_tables(trees[REGISTRIES][0], set(trees))
    by_what = {what: mods for what, mods in tables.values()}
    aliases: dict[str, dict[str, set[str]]] = {}  # module -> local name -> the table's modules
    for name, (tree, _) in trees.items():
        for node in tree.body:
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Attribute)
                    and isinstance(node.value.value, ast.Name) and node.value.value.id == "registries"
                    and node.value.attr in tables):
                for t in node.targets:
                    aliases.setdefault(name, {})[t.id] = tables[node.value.attr][1]
    out: dict[str, set[str]] = {}
    for name, (tree, imports) in trees.items():
        local = dict(aliases.get(name, {}))
        for imp in imports:  # `from .registry import HEADS`
            local.update({n: aliases[imp.imported][n] for n in imp.names
                          if n in aliases.get(imp.imported, {})})
        parents = _parents(tree)
        found: set[str] = set()
        for node in ast.walk(tree):
            mods = None
            if isinstance(node, ast.Name) and node.id in local:
                mods = local[node.id]
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id == "registries" and node.attr in tables):
                mods = tables[node.attr][1]
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "registry" and node.args
                  and isinstance(node.args[0], ast.Constant)):
                mods = by_what.get(node.args[0].value, set())
            if mods and _resolves(node, parents.get(node)):
                found |= mods
        out[name] = found - {name}
    return out


def import_graph() -> dict[str, set[str]]:
    trees = parsed()
    by_string = string_imports(trees)
    return {name: {imp.imported for imp in imports if imp.imported != name} | by_string[name]
            for name, (_, imports) in trees.items()}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph.get(todo.pop(), set()) - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The modules of each import cycle (strongly connected groups), each sorted."""
    reach = {m: _reachable(graph, m) for m in graph}
    groups = {frozenset(b for b in graph if b == a or (b in reach[a] and a in reach[b]))
              for a in graph if a in reach[a]}
    return sorted(sorted(g) for g in groups)


# ------------------------------------------------------------------------------- tests
def test_the_checks_see_what_they_look_for() -> None:
    # Guards the tests below against passing vacuously (a moved tree, a broken resolver).
    src = ("from ..encoders import _entry, Encoder\n"
           "from ..model import bundle as b, rundir\n"
           "def f():\n"
           "    from .export import export_encoders\n"
           "    return b._save, rundir.ok, b.__name__\n")
    known = {"mmtag.encoders", "mmtag.model.bundle", "mmtag.model.rundir", "mmtag.model.export"}
    imports = imports_of("mmtag.model.fake", ast.parse(src), known)
    assert {i.imported for i in imports} == known
    assert private_uses("mmtag.model.fake", ast.parse(src), imports) == [
        "mmtag.model.fake:1 imports mmtag.encoders._entry", "mmtag.model.fake:5 uses mmtag.model.bundle._save"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    assert {"mmtag", "mmtag.api", "mmtag.encoders", "mmtag.model.export"} <= set(graph)
    assert "mmtag.encoders" in graph["mmtag.model.export"] and "mmtag.errors" in graph["mmtag.encoders.registry"]
    # by string: looking an entry up imports the modules its registry names; reading names does not
    registries = ('HEADS = Registry("fusion head", {"a": "mmtag.heads.single:A", "b": "torch:B"})\n')
    lookups = ("from . import registries\nALIAS = registries.HEADS\n"
               "def f(n):\n    return ALIAS[n], registries.registry('fusion head').get(n)\n")
    names_only = ("from . import registries\n"
                  "def g(n):\n    return n in registries.HEADS, list(registries.registry('fusion head'))\n")
    trees = {name: (ast.parse(src), imports_of(name, ast.parse(src), {"mmtag.registries"}))
             for name, src in (("mmtag.registries", registries), ("mmtag.heads.single", ""),
                               ("mmtag.lookups", lookups), ("mmtag.names_only", names_only))}
    found = string_imports(trees)
    assert found["mmtag.lookups"] == {"mmtag.heads.single"} and found["mmtag.names_only"] == set()
    assert "mmtag.heads.single" in graph["mmtag.heads.registry"]


def test_no_import_cycles() -> None:
    graph = import_graph()
    for importer, imported in KNOWN_CYCLE_EDGES:
        graph[importer].discard(imported)
    found = [" <-> ".join(group) + "  (edges: " + ", ".join(
        f"{a} -> {b}" for a in group for b in sorted(graph[a]) if b in group) + ")"
        for group in cycles(graph)]
    assert not found, "import cycles:\n" + "\n".join(found)


def test_known_cycle_exceptions_are_still_needed() -> None:
    # A tolerated edge that no longer exists, or no longer closes a cycle, must leave the list.
    graph = import_graph()
    for (importer, imported), why in KNOWN_CYCLE_EDGES.items():
        assert imported in graph[importer], f"{importer} -> {imported} is gone: drop it ({why})"
        assert importer in _reachable(graph, imported), \
            f"{importer} -> {imported} closes no cycle now: drop it ({why})"


def test_no_module_uses_a_private_name_of_another() -> None:
    found = [use for name, (tree, imports) in parsed().items()
             for use in private_uses(name, tree, imports)]
    assert not found, "private names used across modules:\n" + "\n".join(found)


# The package tree follows the data. A module may import its own package and those before it,
# never one after it: the library never reaches up into the jobs or the faces. (`config` sits
# after `data` and `encoders` because validating a config names their augmentations and
# encoders; `decision` before `training` because training validates with tuned thresholds.)
LAYERS = ["version", "errors", "io", "registries", "dist", "progress", "data", "encoders", "config", "features", "heads",
          "decision", "training", "model", "presets", "jobs", "api", "serve", "cli", "__main__"]
FACES = {"cli", "serve", "__main__"}


def _layer(module: str) -> int:
    parts = module.split(".")
    return len(LAYERS) if len(parts) == 1 else LAYERS.index(parts[1])


def test_every_module_is_in_a_layer() -> None:
    for module in import_graph():
        if module != PACKAGE:
            assert module.split(".")[1] in LAYERS, f"{module}: add its package to LAYERS"


def test_no_module_imports_a_later_layer() -> None:
    found = [f"{a} -> {b}" for a, bs in import_graph().items() for b in sorted(bs)
             if _layer(b) > _layer(a)]
    assert not found, "imports against the pipeline order:\n" + "\n".join(found)


def _face(module: str) -> bool:
    return module.split(".")[1:2] != [] and module.split(".")[1] in FACES


def test_nothing_but_a_face_imports_a_face() -> None:
    # `mmtag serve` is a CLI command, so the cli starts the server; the library never does.
    found = [f"{a} -> {b}" for a, bs in import_graph().items() for b in bs
             if _face(b) and not _face(a)]
    assert not found, "modules importing the cli or the server:\n" + "\n".join(found)


def test_version_matches_pyproject() -> None:
    from mmtag.version import __version__

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    assert f'\nversion = "{__version__}"\n' in pyproject
