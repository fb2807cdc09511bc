"""The package's layering, read from its source: imports only look down, no cycles, small modules.

Layers (docs/design.md), bottom to top: core -> families -> methods -> patching -> library
(data, evaluation, hub, training, metrics, testing) -> integrations -> recipes -> cli.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_moe_routing"
LAYERS = {
    "core": 1,
    "families": 2,
    "methods": 3,
    "patching": 4,
    "data": 5,
    "evaluation": 5,
    "hub": 5,
    "training": 5,
    "metrics": 5,
    "testing": 5,
    "integrations": 6,
    "recipes": 7,
    "cli": 8,
}
#: Inside layer 5 the folders may use each other in this order only (data below the rest).
LIBRARY_ORDER = {"data": 0, "evaluation": 1, "metrics": 1, "hub": 2, "testing": 2, "training": 3}
MAX_LINES = 420
#: modules every method may import (kept_gain: the learned weight rule over kept experts, any variable-k routing)
SHARED_METHOD_MODULES = {"base", "routing", "kept_gain", "__init__"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) of every hf_moe_routing import in ``path``, lazy ones included."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
            found += [(name, node.lineno) for name in names if _is_module(name)] or [(target, node.lineno)]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
    return [(name, line) for name, line in found if name.split(".")[0] == "hf_moe_routing"]


def _runtime_nodes(tree: ast.AST):
    """Every node, except those under ``if TYPE_CHECKING:`` (annotations only, never imported at run time)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _is_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative / "__init__.py").is_file()


def _place(name: str) -> tuple[int, int] | None:
    parts = name.split(".")
    if len(parts) < 2 or parts[1] not in LAYERS:
        return None  # the top-level package itself
    return LAYERS[parts[1]], LIBRARY_ORDER.get(parts[1], 0)


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_package_folder_has_a_layer():
    folders = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in SOURCES}
    assert folders - {"__init__"} <= set(LAYERS), (
        f"put {sorted(folders - set(LAYERS) - {'__init__'})} in LAYERS"
    )


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_look_down(path):
    source = _module_name(path)
    here = _place(source)
    if here is None:
        return  # hf_moe_routing/__init__.py re-exports everything (lazily)
    for target, line in _imports(path):
        assert target != "hf_moe_routing", (
            f"{path.name}:{line} imports the top-level package (a back-up import)"
        )
        there = _place(target)
        assert there is not None and there <= here, f"{source}:{line} imports {target}, which is above it"
        if (
            here[0] == there[0] == LAYERS["methods"]
            and min(len(source.split(".")), len(target.split("."))) > 2
        ):
            own, other = source.split(".")[2], target.split(".")[2]
            assert own == other or other in SHARED_METHOD_MODULES or own in SHARED_METHOD_MODULES, (
                f"{source}:{line} imports another method's internals ({target}); move the shared part to "
                "core.ops or methods.routing"
            )


def test_there_are_no_import_cycles():
    graph = {_module_name(p): {t for t, _ in _imports(p)} for p in SOURCES}
    # a package's __init__ re-exporting its own submodules is not a cycle of the design
    for name, targets in graph.items():
        graph[name] = {t for t in targets if not name.startswith(t + ".") and t in graph}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines; split it (limit ~400)"


# ---- method knowledge stays in methods/<name>/ (issue 21) -------------------------------------------
#: Ada-K's trainer is Ada-K's own code outside its method folder (the loop; the math is in methods/adak).
METHOD_HOMES = {"adak": ("methods/adak/", "training/adak/")}
FIT_HOOKS = {"begin_fit", "end_fit", "abort_fit"}


def _method_names() -> dict[str, str]:
    """Every registered method name and config / layer class name -> the method it belongs to."""
    from hf_moe_routing import ROUTING_METHODS

    owners = {}
    for name in ROUTING_METHODS.builtin():
        owners[name] = name
        for path in (PACKAGE / "methods" / name).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    owners[node.name] = name
    return owners


def _method_checks(path: Path, owners: dict[str, str]) -> list[tuple[int, str, str]]:
    """(line, method, what) of each name or type check of a specific method in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            text = " ".join(ast.unparse(o) for o in operands)
            if "routing_type" in text or "method" in text:
                for operand in operands:
                    for const in ast.walk(operand):
                        if isinstance(const, ast.Constant) and const.value in owners:
                            found.append((node.lineno, owners[const.value], ast.unparse(node)))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass"):
            for name in ast.walk(node.args[1]) if len(node.args) > 1 else ():
                if isinstance(name, ast.Name | ast.Attribute):
                    label = name.id if isinstance(name, ast.Name) else name.attr
                    if label in owners:
                        found.append((node.lineno, owners[label], ast.unparse(node)))
        elif (
            isinstance(node, ast.Call) and getattr(node.func, "id", None) == "hasattr" and len(node.args) == 2
        ):
            attr = node.args[1]
            if isinstance(attr, ast.Constant) and attr.value in FIT_HOOKS:
                found.append((node.lineno, "", ast.unparse(node)))
        elif isinstance(node, ast.Dict) and all(isinstance(v, ast.Constant) for v in node.values):
            # a lookup table keyed by method names (e.g. display names by routing type)
            keys = [k.value for k in node.keys if isinstance(k, ast.Constant)]
            methods = {owners[k] for k in keys if k in owners and owners[k] == k}
            if len(methods) >= 2:
                found.append((node.lineno, sorted(methods)[0], ast.unparse(node)[:80]))
    return found


def test_no_name_or_type_check_of_a_method_outside_its_folder():
    """``routing_type == "adak"``, ``isinstance(routing, LossControlledConfig)``, ``hasattr(layer,
    "begin_fit")``, tables keyed by method names: what a method needs is a trait on its config
    (``RoutingConfig.requires``, ``variable_k``, ``display_name``) and a hook on its layer."""
    owners = _method_names()
    offences = []
    for path in SOURCES:
        relative = path.relative_to(PACKAGE).as_posix()
        if relative == "methods/base.py":  # the registry's table of built-in methods
            continue
        for line, method, what in _method_checks(path, owners):
            homes = METHOD_HOMES.get(method, (f"methods/{method}/",)) if method else ()
            if method and any(relative.startswith(home) for home in homes):
                continue
            offences.append(f"{relative}:{line}: {what}")
    assert not offences, "method knowledge outside its method's folder:\n" + "\n".join(offences)


def test_the_method_check_scan_finds_what_it_looks_for(tmp_path):
    owners = {"adak": "adak", "LossControlledConfig": "loss_controlled", "bip": "bip", "topk": "topk"}
    bad = tmp_path / "bad.py"
    bad.write_text(
        "if config.routing_type == 'adak': pass\n"
        "if isinstance(routing, LossControlledConfig): pass\n"
        "if hasattr(layer, 'begin_fit'): pass\n"
        "names = {'bip': 'BIP', 'topk': 'top-k'}\n"
        "if 'topk' in results: pass\n"  # a results key, not a method check
    )
    assert [line for line, *_ in _method_checks(bad, owners)] == [1, 2, 3, 4]


def test_layers_get_their_settings_as_arguments_never_their_config():
    """One config -> layer convention: ``create_layer`` passes settings; no layer keeps ``self.config``."""
    offences = []
    for path in sorted((PACKAGE / "methods").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "config"
                and getattr(node.value, "id", "") == "self"
            ):
                offences.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offences, f"a routing layer reads its config object: {offences}"


# ---- scripts/: they import the package; the package never imports them --------------------------------
SCRIPTS = PACKAGE.parent / "scripts"
SCRIPT_SOURCES = sorted(SCRIPTS.glob("*.py"))
SCRIPT_MODULES = {p.stem for p in SCRIPT_SOURCES}


def _absolute_imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every absolute import in ``path``, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level:
            found.append((node.module or "", [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
    return found


def _public_names() -> set[str]:
    """The names ``hf_moe_routing/__init__.py`` exports (its ``_EXPORTS`` table, read from the source)."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "_EXPORTS":
            return {key.value for key in node.value.keys} | {"__version__"}
    raise AssertionError("hf_moe_routing/__init__.py has no _EXPORTS table")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_package_never_imports_scripts(path):
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            top = name.split(".")[0]
            assert top != "scripts" and top not in SCRIPT_MODULES, (
                f"{path.relative_to(PACKAGE)}:{node.lineno} imports {name} from scripts/: move what it needs into "
                "the package (scripts are experiments built on the package, not part of it)"
            )


@pytest.mark.parametrize("path", SCRIPT_SOURCES, ids=lambda p: p.name)
def test_scripts_import_only_what_the_package_has(path):
    """A script's imports of the package name modules and public names that exist (a moved module fails
    here, not when someone runs the script), and scripts never import the tests."""
    public = _public_names()
    for module, names, line in _absolute_imports(path):
        top = module.split(".")[0]
        assert top != "tests", f"scripts/{path.name}:{line} imports the tests ({module})"
        if top != "hf_moe_routing":
            continue
        assert _is_module(module), (
            f"scripts/{path.name}:{line} imports {module}, which is not a module of the package"
        )
        if module == "hf_moe_routing":
            unknown = [n for n in names if n not in public and not _is_module(f"{module}.{n}")]
            assert not unknown, (
                f"scripts/{path.name}:{line} imports {unknown} from hf_moe_routing, which does not export them"
            )
