"""The package's floors (``STYLE.md``): each module imports only the floors below it, no private
name crosses a module (in the package, the tests, the benchmarks or the tutorials), and the
evaluation package keeps small files with no module-level mutable state.

The private modules ``_math`` (the mathematical kernel), ``_tl`` (the TransformerLens backend
seam) and ``_bridge`` (its TransformerLens 4 side, used by ``_tl`` only) are the package's documented lower floors: they may be imported, but none of their own
underscore names may be used outside them."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tl_thoughts"
SEAMS = {"_math", "_tl", "_bridge"}  # private modules whose public names the package's floors use

# the floors, lowest first: a module may import its own floor and those below
FLOORS = {
    "errors": 0, "version": 0, "models": 0, "bridges": 0, "prompts": 0,
    "fingerprint": 1,
    "_math": 1,
    "_tl": 2, "_bridge": 2,
    "chunks": 3, "templates": 3, "tasks": 3,
    "stream": 4,
    "updates": 5, "patch": 5,
    "exact_weights": 6, "verification": 6, "thoughts": 6, "refine": 6, "analysis": 6,
    "plots": 7,
    "evaluation": 8,
    "__init__": 9, "demo": 10, "cli": 11,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0] if rel.parts[0] != "__init__" or len(rel.parts) > 1 else "__init__"


def _sources(*folders: str) -> list[Path]:
    out = []
    for folder in folders:
        out += sorted((ROOT / folder).rglob("*.py"))
    assert out, folders
    return out


def _imports(tree: ast.AST):
    """(module imported from, names) for every ``from tl_thoughts... import`` and
    ``import tl_thoughts...``, wherever it stands (module level or inside a function)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tl_thoughts":
            yield node.module, [(a.name, a.asname) for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "tl_thoughts":
                    yield a.name, []


def test_every_module_is_on_a_floor():
    names = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    assert names <= set(FLOORS), names - set(FLOORS)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_each_module_imports_only_its_floor_and_those_below(path):
    own = _module_name(path)
    for module, names in _imports(ast.parse(path.read_text())):
        parts = module.split(".")
        targets = [parts[1]] if len(parts) > 1 else [n for n, _ in names if n in FLOORS]
        if len(parts) == 1 and not targets:
            targets = ["__init__"]  # `import tl_thoughts` / `from tl_thoughts import __version__`
        for target in targets:
            assert FLOORS[target] <= FLOORS[own], f"{own} (floor {FLOORS[own]}) imports {target} (floor {FLOORS[target]})"


@pytest.mark.parametrize("path", _sources("tl_thoughts", "tests", "tests_tl4", "benchmarks", "tutorials"),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_name_crosses_a_module(path):
    tree = ast.parse(path.read_text())
    aliases = set()  # local names bound to tl_thoughts modules
    for module, names in _imports(tree):
        for name, asname in names:
            private = name.startswith("_") and not name.startswith("__") and name not in SEAMS
            assert not private, f"{path.name} imports {name} from {module}"
            aliases.add(asname or name)
        if not names:
            aliases.add(module.split(".")[0])
    aliases |= {"tt", "tl_thoughts"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            attr = node.attr
            private = attr.startswith("_") and not attr.startswith("__") and attr not in SEAMS
            assert not private, f"{path.name}:{node.lineno} uses {node.value.id}.{attr}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "evaluation").glob("*.py")), ids=lambda p: p.name)
def test_the_evaluation_package_keeps_small_files_and_no_module_state(path):
    text = path.read_text()
    assert len(text.splitlines()) <= 600, path.name
    tree = ast.parse(text)
    assert not any(isinstance(node, ast.Global) for node in ast.walk(tree)), f"{path.name} rebinds a global"
    for node in tree.body:  # no module-level list, dict or set that code could mutate
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            continue
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, (ast.List, ast.Dict, ast.Set)):
            pytest.fail(f"{path.name}:{node.lineno}: a mutable module-level value")


def test_fit_thought_is_small():
    """The fit's public entry and its body stay readable: at most 8 parameters, none private,
    and about 80 lines of body."""
    import inspect

    from tl_thoughts import thoughts

    params = inspect.signature(thoughts.fit_thought).parameters
    assert len(params) <= 8 and not any(p.startswith("_") for p in params)
    tree = ast.parse(inspect.getsource(thoughts))
    body = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_fit")
    assert body.end_lineno - body.lineno <= 80

