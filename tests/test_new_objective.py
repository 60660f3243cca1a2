"""A new objective is one module plus one YAML (docs/architecture.md, "Adding an objective"): the loaders read
its target through its reader, the loop, the figures and multi_task use it through the Task protocol, and no
vitsweep file changes. The module and the YAML here are the ones the docs walk through, written into a folder
of the test's own and found through hydra.searchpath and PYTHONPATH."""

from __future__ import annotations

import os
import textwrap

from conftest import TINY_RUN, read_summary, run_cli

MODULE = textwrap.dedent('''
    """task=counting: a count per image (people in a crowd), a Poisson rate from the linear head."""
    import torch
    import torch.nn.functional as F

    from vitsweep.data.targets import Values
    from vitsweep.task import Evaluator, Objective
    from vitsweep.task.heads import PooledLinear


    class CountingEvaluator(Evaluator):
        def __init__(self):
            self.errors, self.losses = [], []

        def update(self, outputs, targets):
            rate, counts = outputs[:, 0].exp(), targets[:, 0]
            self.errors.append((rate - counts).abs())
            self.losses.append(F.poisson_nll_loss(outputs[:, 0], counts, reduction="none"))

        def compute(self, prefix):
            return {f"{prefix}/loss": torch.cat(self.losses).mean().item(),
                    f"{prefix}/mae": torch.cat(self.errors).mean().item()}


    class Counting(Objective):
        name, target_name = "counting", "count"

        def __init__(self, column=None, monitor="val/mae", monitor_mode="min", weight=1.0, aux_heads=(), aux=None):
            self.num_outputs, self.monitor, self.monitor_mode = 1, monitor, monitor_mode
            self.configure(aux_heads, aux, column=column, weight=weight)

        def reader(self):
            return Values(self.target_name, [self.column or "count"])

        def head_args(self):
            return {"num_classes": 1}  # the trunk's linear head: the log of the rate

        def head(self, dim, **geometry):
            return PooledLinear(dim, 1)

        def head_loss(self, outputs, targets):
            return F.poisson_nll_loss(outputs[:, 0], targets[:, 0])

        def head_evaluator(self):
            return CountingEvaluator()

        def head_title(self, output, target, class_names):
            return f"count {output.exp().item():.1f}" + ("" if target is None else f" | true {target.item():.0f}")
''')
YAML = "_target_: counting.Counting\ncolumn: null\nmonitor: val/mae\nmonitor_mode: min\n"


def test_a_new_objective_is_a_head_type_of_multi_task(tmp_path, monkeypatch):
    from vitsweep.task import MultiTask

    (tmp_path / "counting.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    task = MultiTask({"crowd": {"type": "counting.Counting", "column": "people"},
                      "riot": {"type": "classification", "column": "riot", "num_classes": 2}})
    assert type(task.objectives["crowd"]).__name__ == "Counting"
    assert task.targets()["crowd"].columns == ["people"] and task.targets()["crowd"].format == "values"


def test_a_new_objective_is_one_module_and_one_yaml(tmp_path):
    (tmp_path / "counting.py").write_text(MODULE)
    (tmp_path / "conf" / "task").mkdir(parents=True)
    (tmp_path / "conf" / "task" / "counting.yaml").write_text(YAML)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    run_cli([*TINY_RUN, f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "task=counting", "viz.enabled_at_end=true",
             "viz.num_images=2"], tmp_path, env=env)
    summary = read_summary(tmp_path / "run")
    assert summary["task"] == "counting" and summary["monitor"] == "val/mae"
    assert {"val/mae", "test/mae", "test/loss"} <= set(summary["metrics"])  # the loop and test used its evaluator
    assert (tmp_path / "run" / "figures" / "attention_00_val0.png").is_file()  # titled by its head_title
