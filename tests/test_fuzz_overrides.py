"""Fuzzing the command line: overrides drawn from the real config tree (group options and leaf keys, with
values of the right type, the wrong type, zero, negative, out of range) either train or fail with one
clear line (ValueError and kin: `error: ...`, exit 2); never a traceback.

Hypothesis draws a batch of jobs; they run as ONE multirun (one process start, the way
tests/test_option_smoke.py does it): each job is a `# @package _global_` file of a test-only config
group `fuzz`, its group choices in its defaults list. In a multirun a failed job is recorded and the
sweep goes on, and a job that fails on anything but bad input logs its traceback: so "no traceback in
any output" is the property. The first failed job is then rerun alone, to see its `error:` line and
exit code 2. Bounded: one batch per run of the test, tiny models, at most 2 epochs of at most 256 images.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import run_cli
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from test_config import composed, group_options

JOBS_PER_SWEEP = 10
# the tiny job every fuzzed one starts from; a drawn value replaces the one here
BASE = {"model": {"embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64, "patch_size": 4},
        "trainer": {"max_epochs": 1, "progress_bar": False}, "viz": {"enabled_at_end": False}}
BASE_GROUPS = {"data": "synthetic"}
# options that train for minutes on a CPU (their sizes) or need a download: not what this test is about
SKIPPED_OPTIONS = {("model", "vit_tiny"), ("model", "vit_small"), ("model", "vit_base")}
SKIPPED_GROUPS = {"experiment", "hparams_search", "logger"}
# keys whose every value is a cost, not a case: compile (minutes on a CPU), where files go, the logger
SKIPPED_KEYS = {"trainer.compile", "trainer.progress_interval_s", "trainer.progress_bar", "viz.enabled_at_end",
                "task_name", "data.source.cache_dir"}
SKIPPED_SECTIONS = ("logger.",)  # the sweep runs with logger=none
# values that bound the run: sizes, counts, epochs
BOUNDED = {
    "trainer.max_epochs": [0, 1, 2, -1], "trainer.max_time": [None, 0, -1, 5],
    "trainer.accumulate_grad_batches": [0, 1, 2, -1], "trainer.log_every_n_steps": [0, 1, -1, 1000],
    "trainer.device": ["cpu", "auto", "cuda", "bogus"], "trainer.precision": ["32", "bf16", "16", "64", "auto"],
    "data.image_size": [0, 8, 12, 16, 17, -4], "data.crop_size": [0, 4, 8, 20, None],
    "data.resize_to": [None, 0, 16, 24, -1], "data.batch_size": [0, 1, 7, 32, -1],
    "data.eval_batch_size": [0, 1, 64, -1], "data.in_channels": [0, 1, 3, 4], "data.num_classes": [0, 1, 2, 4, 11],
    "data.source.num_train": [0, 1, 8, 64], "data.source.num_val": [0, 1, 8], "data.source.num_test": [0, 1, 8],
    "model.embed_dim": [0, 16, 32, 33], "model.depth": [0, 1, 2], "model.num_heads": [0, 1, 2, 3],
    "model.mlp_dim": [0, 16, 64], "model.patch_size": [0, 2, 4, 5, 16, 32], "model.patch_stride": [None, 0, 2, 5],
    "threads": [None, 0, 1, -1], "seed": [0, -1, 2**40],
}


def leaves(node, prefix: str = ""):
    """(dotted key, value) of every leaf of the composed config, sections of the job only."""
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and not path.startswith(("data.source", "hydra", "paths")):
            yield from leaves(value, path + ".")
        elif isinstance(value, dict) and path == "data.source":
            yield from ((f"{path}.{k}", v) for k, v in value.items() if k != "_target_")
        elif not path.startswith(("hydra", "paths")) and not str(key).startswith("_"):
            yield path, value


def candidate_values(key: str, default) -> list:
    if key in BOUNDED:
        return BOUNDED[key]
    if isinstance(default, bool):
        return [True, False, "bogus"]
    if isinstance(default, int):
        return sorted({default, 0, 1, -1, 3}) + ["bogus"]
    if isinstance(default, float):
        return sorted({default, 0.0, -1.0, 0.5, 1e-3, 2.0}) + [float("nan"), "bogus"]
    if isinstance(default, str):
        return [default, "bogus", ""]
    if isinstance(default, list):
        return [default, [], ["bogus"], [0.5]]
    return [None, 0, 1, "bogus"]  # null defaults: anything may be asked of them


def config_tree() -> tuple[dict[str, list], list[tuple[str, list]]]:
    """The real tree: {group: its options}, and [(leaf key, the values to draw)]."""
    groups: dict[str, list] = {}
    for group, option in group_options():
        if group.split("/")[0] not in SKIPPED_GROUPS and (group, option) not in SKIPPED_OPTIONS:
            groups.setdefault(group, []).append(option)
    cfg = OmegaConf.to_container(composed(["data=synthetic"]), resolve=False)
    keys = [(key, candidate_values(key, value)) for key, value in leaves(cfg)
            if key not in SKIPPED_KEYS and not key.startswith(SKIPPED_SECTIONS)
            and not (isinstance(value, str) and "${" in value)]
    return groups, sorted(keys)


GROUPS, KEYS = config_tree()


@st.composite
def fuzzed_job(draw) -> tuple[dict[str, str], dict[str, object]]:
    """1-3 group choices or key values: ({group: option}, {dotted key: value})."""
    choices, values = {}, {}
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            group = draw(st.sampled_from(sorted(GROUPS)))
            choices[group] = draw(st.sampled_from(GROUPS[group]))
        else:
            key, candidates = draw(st.sampled_from(KEYS))
            values[key] = draw(st.sampled_from(candidates))
    return choices, values


def nested(values: dict[str, object]) -> dict:
    """BASE with the drawn values set at their dotted keys."""
    tree = OmegaConf.create(BASE)
    for key, value in values.items():
        OmegaConf.update(tree, key, value, force_add=True)
    return OmegaConf.to_container(tree)


def write_job(group_dir: Path, name: str, choices: dict[str, str], values: dict[str, object]) -> str:
    """The job as a config file; returns how it reads as overrides (for failure messages)."""
    defaults = [{f"override /{group}": option} for group, option in {**BASE_GROUPS, **choices}.items()]
    body = {"defaults": [*defaults, "_self_"], **nested(values)}
    (group_dir / f"{name}.yaml").write_text("# @package _global_\n" + yaml.safe_dump(body))
    return " ".join([*(f"{g}={o}" for g, o in choices.items()), *(f"{k}={v}" for k, v in values.items())])


@pytest.mark.slow
@settings(max_examples=1, deadline=None, database=None, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(jobs=st.lists(fuzzed_job(), min_size=JOBS_PER_SWEEP, max_size=JOBS_PER_SWEEP))
def test_fuzzed_overrides_train_or_fail_with_one_line(jobs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    group_dir = tmp / "fuzz_conf" / "fuzz"
    group_dir.mkdir(parents=True)
    described = {f"job{i}": write_job(group_dir, f"job{i}", *job) for i, job in enumerate(jobs)}
    proc = run_cli([f"hydra.searchpath=[file://{tmp / 'fuzz_conf'}]", f"+fuzz={','.join(described)}", "logger=none"],
                   tmp, multirun=True, check=False, timeout=1500)
    output = proc.stdout + proc.stderr
    assert proc.returncode in (0, 1), output[-4000:]  # 1: some jobs failed (docs/sweeps.md)
    summaries = {}
    for summary_path in (tmp / "sweep").glob("*/summary.json"):
        summary = json.loads(summary_path.read_text())
        name = next(o.split("=", 1)[1] for o in summary["overrides"] if o.startswith("+fuzz="))
        summaries[name] = (summary_path.parent, summary)
    assert set(summaries) == set(described), output[-4000:]
    for name, (job_dir, summary) in summaries.items():
        run_log = (job_dir / "run.log").read_text()
        assert "Traceback" not in run_log, f"{described[name]}:\n{run_log[-3000:]}"
        assert summary["status"] in ("completed", "failed"), described[name]
        if summary["status"] == "failed":
            assert "\n" not in summary["error"], f"{described[name]}: {summary['error']}"
    assert "Traceback" not in output, output[-4000:]

    failed = sorted(name for name, (_, summary) in summaries.items() if summary["status"] == "failed")
    if failed:  # alone, the same job exits 2 with its one error line
        alone = run_cli([f"hydra.searchpath=[file://{tmp / 'fuzz_conf'}]", f"+fuzz={failed[0]}", "logger=none"],
                        tmp / "alone", check=False)
        errors = [line for line in alone.stderr.splitlines() if line.startswith("error: ")]
        assert alone.returncode == 2 and len(errors) == 1 and "Traceback" not in alone.stderr, \
            f"{described[failed[0]]}: exit {alone.returncode}\n{alone.stderr[-3000:]}"
