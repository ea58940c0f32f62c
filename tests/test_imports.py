"""Imports flow one way: no circles among fada_batch's modules, and no part imports a later one.

The parts, first to last (a module may import its own part and earlier ones):

    shared  config, fsutil, text, killpoints, logsetup, the package itself
    data    categories, sheets, images, dataset, problems, split, validate, samples
    training    model, collate, features, step, recipe, checkpoint, outputs, progress, summary, tblog, card
    evaluation  evaluate, ask, metrics, question_scores, clinical, intervals
    run     task (trains, then evaluates), launch, requeue, slurmjobs, collect, questions, report, report_questions
    tools   bench, stage, export, tiny, demo
    cli     the command line: the only module that imports every part (and __main__ it)

Every import counts, also one inside a function: a lazy import still ties the two modules
together (the circle this test was written for, training calling evaluation and evaluation
importing training, went through one). The graph is read from the source with `ast`, so
nothing is imported to check it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fada_batch"

LAYERS = ["shared", "data", "training", "evaluation", "run", "tools", "cli"]

# Each allowed edge against the order, with why it is harmless.
EXCEPTIONS = {
    ("fada_batch.config", "fada_batch.data.categories"): (
        "config checks `data.categories` against the category catalogue; the catalogue is a "
        "leaf that imports no fada_batch module (asserted below), so no circle can pass here"
    ),
}


def module_name(path: Path, root: Path) -> str:
    """`fada_batch.training.recipe` for root/fada_batch/training/recipe.py (packages: their name)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path, package: str = "fada_batch") -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in the file), from the source."""
    files = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package, one level up per extra dot
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join([*base, node.module] if node.module else base)
                else:
                    mod = node.module or ""
                # `from fada_batch.training import checkpoint`: the submodule, not the package
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in files else mod for a in node.names]
            else:
                continue
            for t in targets:
                # `import fada_batch.run.task` names the module; an attribute path its module
                while t and t not in files and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in files and t != name:
                    found.add(t)
        graph[name] = found
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle a depth-first walk meets, each as a path that ends where it starts."""
    cycles: list[list[str]] = []
    state: dict[str, str] = {}  # "open" while on the walk's path, then "done"
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def layer_of(module: str) -> str:
    """The part a module belongs to (see the module docstring)."""
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS[1:-1]:  # a part's modules and its __init__
        return parts[1]
    if parts[-1] in ("cli", "__main__"):
        return "cli"
    return "shared"


def wrong_way(graph: dict[str, set[str]]) -> list[str]:
    """Imports of a later part than the importer's own, except the listed `EXCEPTIONS`."""
    bad = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if (module, target) in EXCEPTIONS:
                continue
            here, there = layer_of(module), layer_of(target)
            if LAYERS.index(there) > LAYERS.index(here):
                bad.append(f"{module} ({here}) imports {target} ({there})")
    return bad


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(PACKAGE.parent)


def test_the_graph_sees_every_module_and_lazy_imports(graph):
    """The walker finds the package's modules and the imports inside functions (the kind the
    old circle went through); else the tests below would pass on an empty graph."""
    assert len(graph) >= 40 and all(layer_of(m) in LAYERS for m in graph)
    assert "fada_batch.evaluation.evaluate" in graph["fada_batch.run.task"]
    # cli imports each part only inside its command functions
    assert {layer_of(t) for t in graph["fada_batch.cli"]} >= set(LAYERS) - {"cli"}


def test_no_import_circles(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_imports_flow_one_way(graph):
    bad = wrong_way(graph)
    assert not bad, (
        "imports against the order " + " -> ".join(LAYERS) + " (a part may import only itself "
        "and earlier parts; whoever composes two parts belongs to a later one, e.g. run.task):\n"
        + "\n".join(bad)
    )


def test_the_exceptions_are_leaves_and_still_needed(graph):
    """An allowed edge against the order stays harmless only while its target imports nothing
    of the package; one that no longer occurs is removed from the list."""
    for (module, target), why in EXCEPTIONS.items():
        assert why and graph[target] == set(), f"{target} now imports {graph[target]}"
        assert target in graph[module], f"{module} no longer imports {target}: drop the exception"


def test_only_the_cli_imports_the_cli(graph):
    importers = sorted(m for m, ts in graph.items() if "fada_batch.cli" in ts)
    assert importers == ["fada_batch.__main__"]


def top_level_imports(path: Path) -> set[str]:
    """The top-level names of the absolute imports in a file (`torch` for `torch.nn`)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_data_knows_nothing_of_torch_and_only_the_launcher_imports_submitit():
    """data/ reads sheets and images without the model's libraries; run.launch is the one
    module that knows submitit (training never knows it runs on SLURM)."""
    model_libraries = {"torch", "transformers", "peft", "bitsandbytes", "accelerate"}
    for path in sorted((PACKAGE / "data").glob("*.py")):
        assert not top_level_imports(path) & model_libraries, path.name
    with_submitit = sorted(
        module_name(p, PACKAGE.parent) for p in PACKAGE.rglob("*.py") if "submitit" in top_level_imports(p)
    )
    assert with_submitit == ["fada_batch.run.launch"]


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_circle_through_a_lazy_import_is_caught(tmp_path):
    """The circle this issue removed, rebuilt in a scratch package: training imports evaluation
    inside a function, evaluation imports training at the top. The checker names it."""
    root = _tree(
        tmp_path,
        {
            "fada_batch/__init__.py": "",
            "fada_batch/training/__init__.py": "",
            "fada_batch/evaluation/__init__.py": "",
            "fada_batch/training/recipe.py": (
                "def train():\n    from fada_batch.evaluation.evaluate import evaluate_after_training\n"
            ),
            "fada_batch/evaluation/evaluate.py": "from fada_batch.training.recipe import train\n",
        },
    )
    g = import_graph(root)
    assert find_cycles(g) == [
        ["fada_batch.evaluation.evaluate", "fada_batch.training.recipe", "fada_batch.evaluation.evaluate"]
    ]
    assert wrong_way(g) == [
        "fada_batch.training.recipe (training) imports fada_batch.evaluation.evaluate (evaluation)"
    ]


def test_relative_and_submodule_imports_are_resolved(tmp_path):
    """`from . import x`, `from ..data import y` and `import a.b as c` all count; a three-module
    circle inside one part is caught though no import goes against the order."""
    root = _tree(
        tmp_path,
        {
            "fada_batch/__init__.py": "",
            "fada_batch/data/__init__.py": "",
            "fada_batch/data/a.py": "from . import b\n",
            "fada_batch/data/b.py": "import fada_batch.data.c as c\n",
            "fada_batch/data/c.py": "from ..data.a import thing\n",
        },
    )
    g = import_graph(root)
    assert g["fada_batch.data.a"] == {"fada_batch.data.b"}
    assert g["fada_batch.data.c"] == {"fada_batch.data.a"}
    assert find_cycles(g) == [
        ["fada_batch.data.a", "fada_batch.data.b", "fada_batch.data.c", "fada_batch.data.a"]
    ]
    assert wrong_way(g) == []
