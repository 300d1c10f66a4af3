"""The package's layers, lowest first, and the rule that holds them: no module imports a module of a higher
layer (counting imports inside functions: a lazy import that points up is still an arrow up).

Within a layer modules may import each other (``tests/test_import_cycles.py`` keeps them free of cycles).
The Dagster layer sits on top; nothing below it imports ``dagster``. Every import of a ``distill_dag`` module
made inside a function says why on its first line (``# lazy: <reason>``): the start-up time of ``distill
--help`` or of the code location, an optional dependency, a child process that must not import the package.
"""

from __future__ import annotations

import ast

from test_import_cycles import ROOT, _imports, import_graph, module_names

# (layer, the module prefixes it holds), lowest first.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("distill_dag.errors", "distill_dag.safe_read", "distill_dag.io", "distill_dag.device",
              "distill_dag.seed_keys")),
    ("kernels", ("distill_dag.kernels",)),
    # the package root registers the student with transformers' Auto classes: it sits with the model
    ("model", ("distill_dag.model", "distill_dag")),
    ("config", ("distill_dag.config", "distill_dag.migrate")),
    ("data", ("distill_dag.data",)),
    ("loss", ("distill_dag.loss",)),  # the teacher/loss contract, the KD loss, perplexity: below both users
    ("training", ("distill_dag.training",)),  # loop, optimizers, checkpoints, distributed, stability, telemetry
    ("teacher", ("distill_dag.teacher",)),  # teacher model, finetune, providers, server, logit cache
    ("student", ("distill_dag.student",)),  # the student trainer, alignment, layer choice, stage entry points
    ("eval", ("distill_dag.eval",)),
    ("cli", ("distill_dag.cli", "distill_dag.train")),
    ("dagster", ("distill_dag.definitions", "distill_dag.defs")),
]
DAGSTER_LAYER = len(LAYERS) - 1


def layer_of(module: str) -> int:
    """The index of the layer whose longest prefix matches ``module``."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    assert best is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return best


def test_every_module_has_a_layer():
    for mod in module_names():
        layer_of(mod)


def test_layer_lookup_takes_the_longest_prefix():
    assert LAYERS[layer_of("distill_dag")][0] == "model"
    assert LAYERS[layer_of("distill_dag.defs.assets.student")][0] == "dagster"
    assert LAYERS[layer_of("distill_dag.io")][0] == "base"
    assert LAYERS[layer_of("distill_dag.teacher.cache.codec")][0] == "teacher"


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    mods = module_names()
    out = []
    for mod, targets in sorted(graph.items()):
        for t, line in sorted(targets.items()):
            if layer_of(t) > layer_of(mod):
                out.append(f"{mods[mod].relative_to(ROOT.parent)}:{line}: {mod} ({LAYERS[layer_of(mod)][0]}) imports "
                           f"{t} ({LAYERS[layer_of(t)][0]})")
    return out


def test_the_check_finds_an_arrow_up():
    g = {"distill_dag.data.pack": {"distill_dag.student.trainer": 3}, "distill_dag.student.trainer": {}}
    found = [m for m in upward_imports(g)]
    assert len(found) == 1 and "data) imports distill_dag.student.trainer (student)" in found[0]


def test_no_module_imports_a_higher_layer():
    found = upward_imports(import_graph())
    assert not found, "imports that point up the layers:\n" + "\n".join(found)


def _function_imports(path) -> list[ast.stmt]:
    """Import statements inside a function body (at any depth), outside ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(), str(path))
    inner = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    inner.add(id(sub))
    return [n for n, _ in _imports(tree) if id(n) in inner]


def _names(node: ast.stmt) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    return [("." * node.level) + (node.module or "")]


def test_nothing_below_the_dagster_layer_imports_dagster():
    found = []
    for mod, path in module_names().items():
        if layer_of(mod) == DAGSTER_LAYER:
            continue
        for node, line in _imports(ast.parse(path.read_text(), str(path))):
            if any(n.split(".")[0] in ("dagster", "dagster_pipes", "dagster_duckdb", "dagster_wandb") for n in _names(node)):
                found.append(f"{path.relative_to(ROOT.parent)}:{line}")
    assert not found, "the core imports dagster: " + ", ".join(found)


def lazy_imports() -> tuple[list[str], list[str]]:
    """(function-level imports of distill_dag modules with a ``# lazy:`` reason, those without)."""
    given, missing = [], []
    for mod, path in module_names().items():
        lines = path.read_text().splitlines()
        for node in _function_imports(path):
            names = _names(node)
            if not any(n == "distill_dag" or n.startswith(("distill_dag.", ".")) for n in names):
                continue
            where = f"{path.relative_to(ROOT.parent)}:{node.lineno}"
            (given if "# lazy:" in lines[node.lineno - 1] else missing).append(where)
    return given, missing


def test_every_function_level_import_of_the_package_says_why():
    given, missing = lazy_imports()
    print(f"{len(given)} function-level imports of distill_dag modules, each with its reason")
    assert not missing, (f"{len(missing)} imports of distill_dag modules inside functions without a `# lazy: <reason>` "
                         "comment on their first line (move them to the module top, or say why they wait):\n"
                         + "\n".join(missing))


def test_the_torchrun_worker_needs_only_the_core_and_dagster_pipes():
    """``defs/pipes_worker.py`` runs on every rank under torchrun: it imports the core and the light
    ``dagster_pipes``, never ``dagster`` itself nor another module of the Dagster layer."""
    mods = module_names()
    path = mods["distill_dag.defs.pipes_worker"]
    names = [n for node, _ in _imports(ast.parse(path.read_text(), str(path))) for n in _names(node)]
    assert "dagster_pipes" in names
    assert not [n for n in names if n.split(".")[0] == "dagster"]
    up = [t for t in import_graph()["distill_dag.defs.pipes_worker"] if layer_of(t) == DAGSTER_LAYER]
    assert not up, f"the worker imports the Dagster layer: {up}"
