"""The reshaped trunk (one block loop with hook points, vitsweep/model/vit.py and hooks.py) computes what the
trunk of main at commit 5462088 computed, before the reshape: tests/reference/trunk_reference.pt, written there
by tests/reference/make_trunk_reference.py, holds 666 cases (every research option under cls and mean pooling,
every pair of options from different groups, the task heads on the trunk, MAE and DINO with the options a
plain encoder takes), each built from conf/ with Hydra overrides and weights filled by state-dict name. For
every case, today's code gives the same outputs to 1e-6 (eval, training, every early exit's logits and where
each sample left, the methods' eval outputs, MAE's visible tokens, DINO's small crops; exit indices exactly),
and every combination refused then is refused now with the same one-line message.

Composing each case with Hydra costs more than building and running it, so the base config (the BASE
overrides) is composed once and each case's overrides are applied to a copy with OmegaConf, parsed by Hydra's
own override parser (`fast_config`); `test_the_fast_config_is_hydras_compose` checks that for cases of every
override kind. The whole file then runs in 20-30 s on two cores (the 450 pair cases in about 14 s).
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from reference.cases import (  # tests/reference/cases.py
    CASES,
    CONF,
    build_case,
    compose_case,
    refusal,
    run_case,
)

REFERENCE = Path(__file__).parent / "reference" / "trunk_reference.pt"


@cache
def reference() -> dict:
    return torch.load(REFERENCE, weights_only=False)


@cache
def base_config():
    """The config every case starts from, composed by Hydra once: cases.BASE on the defaults of every group."""
    config = compose_case([])
    OmegaConf.set_struct(config, False)  # a case may set a group the defaults leave out (pretrain=mae)
    return config


@cache
def group_option(group: str, option: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"))


@cache
def override_parser() -> OverridesParser:
    return OverridesParser.create()


def fast_config(overrides: list[str]):
    """What `compose_case(overrides)` gives, for the overrides the cases use: each config group's option
    (model/prompt=deep, task=segmentation, pretrain=mae: its YAML in place of the group's node, as Hydra puts
    the defaults tree together first), then the values (model.prompt.length=2, +task.aux.x.block=-2) in
    order, each parsed by Hydra's own override parser."""
    config = copy.deepcopy(base_config())
    parsed = override_parser().parse_overrides(overrides)
    is_group = [(CONF / override.key_or_group).is_dir() for override in parsed]
    for override, group in zip(parsed, is_group):
        if group:
            option = group_option(override.key_or_group, override.value())
            OmegaConf.update(config, override.key_or_group.replace("/", "."), option, merge=False)
    for override, group in zip(parsed, is_group):
        if not group:
            OmegaConf.update(config, override.key_or_group, override.value(), merge=True)
    return config


# the reference was written with one thread: the same order of summation
pytestmark = pytest.mark.usefixtures("one_thread")


def compare(got, expected, where: str) -> None:
    if isinstance(expected, dict):
        assert isinstance(got, dict) and set(got) == set(expected), f"{where}: {sorted(got)} != {sorted(expected)}"
        for key in expected:
            compare(got[key], expected[key], f"{where}/{key}")
        return
    assert got.shape == expected.shape and got.dtype == expected.dtype, f"{where}: {got.shape} {got.dtype}"
    if expected.is_floating_point():
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6, msg=lambda m: f"{where}: {m}")
    else:  # exit indices
        assert torch.equal(got, expected), where


@pytest.mark.parametrize("name", list(CASES))
def test_the_trunk_computes_what_it_did_at_5462088(name):
    case, expected = CASES[name], reference()[name]
    assert expected["overrides"] == case["overrides"]  # the case is the one recorded
    torch.manual_seed(0)
    try:
        model = build_case(case, fast_config(case["overrides"]))
    except Exception as err:  # noqa: BLE001 -- a refusal, compared with the recorded one below
        assert refusal(err) == expected.get("error"), f"refused, but {name} was not (or with another message)"
        return
    assert "error" not in expected, f"built, but 5462088 refused it: {expected['error']}"
    compare(run_case(model, case), expected["outputs"], name)


def test_the_reference_covers_every_case_and_refusals_are_one_line():
    assert set(reference()) == set(CASES) and len(CASES) == 666
    errors = [entry["error"] for entry in reference().values() if "error" in entry]
    assert len(errors) == 107 and all("\n" not in error for error in errors)


@pytest.mark.parametrize("name", ["prompt=deep/cls", "head=segmentation_pixel/mean", "method=dino+stem=conv/mean",
                                  "head=aux_heads+token_pruning=tome/cls", "temporal=divided+metadata=film/cls",
                                  "early_exit=confidence+attention=windowed/mean"])
def test_the_fast_config_is_hydras_compose(name):
    overrides = CASES[name]["overrides"]
    hydra = OmegaConf.to_container(compose_case(overrides))
    assert OmegaConf.to_container(fast_config(overrides)) == hydra
