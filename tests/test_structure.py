"""The shape of the house: the import graph of vitsweep/ has no cycles and no upward arrows (every package
sits on a layer and imports only its own layer and the ones below), the loop imports no component, and
building a model does no I/O (weights are the factory's business, after construction)."""

from __future__ import annotations

import ast
import builtins
import io
from pathlib import Path

import pytest
import torch
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig
from test_config import REQUIRED, composed, group_options

PACKAGE = Path(__file__).resolve().parents[1] / "vitsweep"
# bottom to top: a package imports its own layer and the layers below it, never one above (docs/architecture.md)
LAYERS = [
    {"logger"},  # the run's record: summary.json, metrics.jsonl, W&B; atomic files
    {"data"},  # loaders, target readers, the DataModule
    {"model"},  # the ViT trunk and its options
    {"viz"},  # attention, explanations, and the drawing of figures
    {"augment", "loss", "metrics", "optimizer", "scheduler", "task", "pretrain"},  # what a run learns, and how
    {"trainer"},  # the one loop: knows the Task protocol's calls, imports no component
    {"run"},  # the job's life: build, modes, record, ranks
    {"cli", "compare", "sweep_files"},  # tools over runs
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_modules(path: Path, modules: set[str], importer: str = "") -> set[str]:
    """The vitsweep modules `path` imports at run time, anywhere in the file (lazy imports inside
    functions count; `if TYPE_CHECKING:` blocks do not). `from a.b import c` is an edge to a.b.c when
    that is a module, else to a.b (the convention of import-linter). Importing a.b.c also runs the
    `__init__` of package a.b, so that is an edge too, unless a.b is the importer's own package (already
    being imported when the importer runs)."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for block in ast.walk(tree) if is_type_checking_block(block) for n in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module)
    own_packages = {importer.rsplit(".", k)[0] for k in range(1, importer.count(".") + 1)}
    parents = {name.rsplit(".", k)[0] for name in found for k in range(1, name.count("."))}
    return {name for name in found | (parents - own_packages) if name in modules}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(files), name) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path [a, b, ..., a], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def top_package(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_the_checker_finds_cycles_and_reads_imports(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nimport vitsweep.x\nfrom vitsweep.y import z, w\n"
                      "if TYPE_CHECKING:\n    from vitsweep.q import r\ndef f():\n    from vitsweep.p import s\n")
    modules = {"vitsweep.x", "vitsweep.y", "vitsweep.y.z", "vitsweep.q", "vitsweep.p", "vitsweep.p.s"}
    assert imported_modules(source, modules) == {"vitsweep.x", "vitsweep.y.z", "vitsweep.y", "vitsweep.p.s", "vitsweep.p"}
    # a module of package p importing its sibling does not re-run p's __init__
    assert imported_modules(source, modules, importer="vitsweep.p.t") == {"vitsweep.x", "vitsweep.y.z", "vitsweep.y",
                                                                         "vitsweep.p.s"}


def test_no_import_cycles_between_modules():
    graph = import_graph()
    assert len(graph) > 30  # the whole package was read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def layer_of(package: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if package in layer)


def test_every_package_sits_on_a_layer():
    packages = {top_package(module) for module in import_graph()} - {""}
    unplaced = sorted(package for package in packages if not any(package in layer for layer in LAYERS))
    assert not unplaced, f"place these in LAYERS (and in docs/architecture.md): {unplaced}"
    assert {"task", "logger", "run"} <= packages  # the packages the layers name are real


def test_no_package_imports_a_layer_above_it():
    upward = [f"{module} imports {target}" for module, targets in import_graph().items()
              if top_package(module) for target in targets if top_package(target)
              and layer_of(top_package(target)) > layer_of(top_package(module))]
    assert not upward, upward


def test_the_checker_catches_an_upward_import(tmp_path):
    """The layer rule can fail: a model module that imported the loop would be reported."""
    graph = {"vitsweep.model.vit": {"vitsweep.trainer.loop"}, "vitsweep.trainer.loop": set()}
    upward = [(m, t) for m, targets in graph.items() for t in targets if layer_of(top_package(t)) > layer_of(top_package(m))]
    assert upward == [("vitsweep.model.vit", "vitsweep.trainer.loop")]


def test_the_loop_imports_no_component():
    """trainer/ drives any task through the Task protocol's calls: it imports no model option (early exit is
    scored by the task's evaluator), no task, no data loader."""
    imported = {target for module, targets in import_graph().items() if top_package(module) == "trainer"
                for target in targets}
    components = sorted(t for t in imported if top_package(t) in {"model", "task", "pretrain", "data", "viz"})
    assert not components, components


def test_every_config_group_has_a_package_of_the_same_name():
    conf = PACKAGE.parent / "conf"
    groups = {path.name for path in conf.iterdir() if path.is_dir()} - {"hydra", "paths", "experiment", "hparams_search"}
    missing = [group for group in groups if not (PACKAGE / group).is_dir()]
    assert not missing, f"conf groups without a vitsweep/<group> package: {missing}"


@pytest.mark.parametrize("option", sorted(option for group, option in set(group_options()) if group == "model"))
def test_building_a_model_opens_no_file(option, monkeypatch):
    cfg = composed([f"model={option}", *REQUIRED.get(("model", option), []), "model.pretrained=null"])
    model_cfg = cfg.model  # composition reads YAML files, and importing the code reads .py files ...
    for node in (model_cfg, *(v for v in model_cfg.values() if isinstance(v, DictConfig))):
        if node.get("_target_"):
            get_object(node._target_)

    def refuse(*args, **kwargs):
        raise AssertionError(f"building model={option} tried to read {args[:1]}")

    for owner, name in ((builtins, "open"), (io, "open"), (torch, "load"), (Path, "open"), (Path, "read_bytes")):
        monkeypatch.setattr(owner, name, refuse)
    model = instantiate(model_cfg)  # ... but building the model reads nothing
    assert model.load_report is None and sum(p.numel() for p in model.parameters()) > 0
