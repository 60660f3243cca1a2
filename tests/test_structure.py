"""The shape of the house: the import graph of vitsweep/ has no cycles and no upward arrows, and
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
# components know nothing of what drives them: these packages never import the ones in HIGH
LOW = {"model", "augment", "data", "metrics", "loss", "optimizer", "scheduler", "task", "pretrain", "logger"}
HIGH = {"trainer", "run", "viz", "compare", "cli"}


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


def test_components_do_not_import_what_drives_them():
    upward = [f"{module} imports {target}" for module, targets in import_graph().items()
              if top_package(module) in LOW for target in targets if top_package(target) in HIGH]
    assert not upward, upward


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
