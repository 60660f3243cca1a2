"""Make real W&B offline runs and read them back with vitsweep.logger.wandb_offline."""

import struct
import zlib

import pytest
import wandb
from conftest import offline_wandb_env

from vitsweep.logger.wandb_offline import (
    BLOCK_SIZE,
    find_offline_runs,
    iter_record_payloads,
    read_offline_run,
)

CONFIG_A = {
    "optimizer": {"lr": 0.001, "name": "adamw"},
    "model": {"depth": 4},
    "overrides": ["model.depth=4", "seed=0"],
}
LOGS_A = [
    {"epoch": 0, "val/acc": 0.25, "val/loss": 1.5, "grad": {"norm": 2.0}},
    {"epoch": 1, "val/acc": 0.5, "val/loss": 1.0, "grad": {"norm": 1.5}},
    {"epoch": 2, "val/acc": 0.75, "val/loss": 0.5, "grad": {"norm": 1.0}},
]
LOGS_B = [{"train/loss": 3.0, "note": "diverged"}, {"train/loss": float("inf"), "flag": True}]
BIG_TEXT = "0123456789" * 10_000  # one 100 kB record: split into first/middle/last fragments


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two runs made one after the other in this process: A exits 0, B exits 1."""
    root = tmp_path_factory.mktemp("wandb_runs")
    with pytest.MonkeyPatch.context() as monkeypatch:
        offline_wandb_env(monkeypatch, root)
        run_a = wandb.init(
            mode="offline",
            dir=root,
            project="vitsweep-test",
            group="sweep-1",
            name="run-a",
            tags=["baseline", "depth4"],
            config=CONFIG_A,
        )
        for values in LOGS_A:
            run_a.log(values)
        run_a.config.update({"added_after_init": 7})
        run_a.summary["best/val/acc"] = 0.75
        run_a.finish(exit_code=0)

        run_b = wandb.init(
            mode="offline",
            dir=root,
            project="vitsweep-test",
            group="sweep-2",
            name="run-b",
            config={"seed": 1, "big": BIG_TEXT},
        )
        for values in LOGS_B:
            run_b.log(values)
        run_b.finish(exit_code=1)
    return root, run_a.id, run_b.id


def read_by_id(root, run_id):
    (path,) = [path for path in find_offline_runs(root) if path.name == f"run-{run_id}.wandb"]
    return read_offline_run(path)


def test_finds_each_run_once(two_runs):
    root, id_a, id_b = two_runs
    paths = find_offline_runs(root)
    # wandb/latest-run is a symlink to B's dir; it must not list B twice
    assert sorted(path.name for path in paths) == sorted([f"run-{id_a}.wandb", f"run-{id_b}.wandb"])
    assert all(path.parent.name.startswith("offline-run-") for path in paths)
    assert find_offline_runs(paths[0]) == [paths[0]]
    assert find_offline_runs(root / "no-such-dir") == []


def test_run_identity_and_config(two_runs):
    root, id_a, _ = two_runs
    run = read_by_id(root, id_a)
    assert (run.run_id, run.name, run.group, run.project) == (id_a, "run-a", "sweep-1", "vitsweep-test")
    assert run.tags == ["baseline", "depth4"]
    # values come back decoded from JSON, nested dicts and lists intact, wandb's _wandb key dropped
    assert run.config == {**CONFIG_A, "added_after_init": 7}


def test_history_has_one_decoded_row_per_log_call(two_runs):
    root, id_a, _ = two_runs
    history = read_by_id(root, id_a).history
    assert [row["_step"] for row in history] == [0, 1, 2]
    for row, logged in zip(history, LOGS_A):
        # "val/acc" stays one key; the logged dict {"grad": {"norm": ...}} comes back nested
        assert {key: row[key] for key in logged} == logged


def test_summary_holds_last_values(two_runs):
    root, id_a, _ = two_runs
    summary = read_by_id(root, id_a).summary
    assert summary["val/acc"] == LOGS_A[-1]["val/acc"]
    assert summary["grad"] == {"norm": LOGS_A[-1]["grad"]["norm"]}
    assert summary["best/val/acc"] == 0.75
    assert summary["_step"] == len(LOGS_A) - 1
    assert "_wandb" not in summary


def test_exit_codes_and_separate_runs(two_runs):
    root, id_a, id_b = two_runs
    run_a, run_b = read_by_id(root, id_a), read_by_id(root, id_b)
    assert (run_a.exit_code, run_a.finished) == (0, True)
    assert (run_b.exit_code, run_b.finished) == (1, True)
    # B, started after A finished in the same process, holds only its own data
    assert (run_b.name, run_b.group, run_b.tags) == ("run-b", "sweep-2", [])
    assert run_b.config == {"seed": 1, "big": BIG_TEXT}
    assert [row["train/loss"] for row in run_b.history] == [3.0, float("inf")]
    assert run_b.history[0]["note"] == "diverged" and run_b.history[1]["flag"] is True
    assert not any("val/acc" in row for row in run_b.history)


def test_reads_run_dir_and_truncated_file(two_runs, tmp_path):
    root, id_a, _ = two_runs
    path = read_by_id(root, id_a).path
    assert read_offline_run(path.parent).run_id == id_a
    # a run killed before finish(): the file stops mid-record, without the exit record
    truncated = tmp_path / "run-truncated.wandb"
    truncated.write_bytes(path.read_bytes()[:-3])
    run = read_offline_run(truncated)
    assert (run.exit_code, run.finished) == (None, False)
    assert len(run.history) == len(LOGS_A)


def frame(record_type, payload):
    return (
        struct.pack("<IHB", zlib.crc32(bytes([record_type]) + payload), len(payload), record_type) + payload
    )


def test_framing_skips_block_padding():
    # fill the first block so that 3 bytes are left: too few for a record header, so zero padding
    header = b":W&B\xe1\xbe\x00"
    filler = b"a" * (BLOCK_SIZE - len(header) - 7 - 3)
    data = header + frame(1, filler) + b"\x00" * 3 + frame(2, b"first-") + frame(4, b"last")
    assert len(header + frame(1, filler)) == BLOCK_SIZE - 3
    assert list(iter_record_payloads(data)) == [filler, b"first-last"]
    with pytest.raises(ValueError, match="crc"):
        list(iter_record_payloads(data[:-1] + b"X"))
    with pytest.raises(ValueError, match="not a .wandb file"):
        list(iter_record_payloads(b"SQLite format 3\x00"))


def test_rejects_payload_that_is_not_a_record(tmp_path):
    path = tmp_path / "run-garbage.wandb"
    path.write_bytes(b":W&B\xe1\xbe\x00" + frame(1, b"\xff\xff\xff"))
    with pytest.raises(ValueError, match="not a wandb Record"):
        read_offline_run(path)
