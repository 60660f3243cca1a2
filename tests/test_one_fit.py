"""One build and one fit for every mode: what train and pretrain share can no longer drift apart.

Before the reshape (commit 5462088) `mode=pretrain` ran its own copy of the fit: a SIGTERM mid-epoch exited
`interrupted` with no checkpoint at all (it ran outside `interrupt.at_step_boundaries()`), and a value its
forward rejects was found after the data was read (no `check_forward`). These are the tests that failed
then. Also: `vitsweep.load` rebuilds a run's model from its checkpoint, for notebooks.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MODEL, read_summary, run_cli
from test_reliability import nonempty_lines, sigterm_while_training

import vitsweep

# an MAE pretraining of 64 steps an epoch, logged every step
PRETRAIN = ["mode=pretrain", "pretrain=mae", "pretrain.decoder_dim=16", "pretrain.decoder_num_heads=2",
            "pretrain.decoder_depth=1", "data=synthetic", "data.source.num_train=1024", "data.batch_size=16",
            *TINY_MODEL, "model.drop_path=0.0", "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
            "trainer.progress_bar=false", "viz.enabled_at_end=false", "logger=none"]


@pytest.mark.slow
def test_sigterm_mid_epoch_in_pretraining_saves_the_step_and_resumes_exactly(tmp_path):
    job_dir = tmp_path / "stopped" / "run"
    state = sigterm_while_training(PRETRAIN, job_dir)  # there is a last.pt: mid-epoch
    assert 0 < state["batch_in_epoch"] == state["step"] < 64

    run_cli([*PRETRAIN, "resume=true"], tmp_path / "stopped")  # the same command continues from that step
    run_cli(PRETRAIN, tmp_path / "straight")
    assert read_summary(job_dir)["status"] == "completed"
    straight, resumed = (torch.load(tmp_path / name / "run" / "checkpoints" / "last.pt", weights_only=True)
                         for name in ("straight", "stopped"))
    assert resumed["step"] == straight["step"] == 128
    for name, value in straight["model"].items():  # encoder, decoder, mask token
        torch.testing.assert_close(resumed["model"][name], value, rtol=0, atol=1e-6, msg=name)


def test_pretraining_checks_the_forward_before_reading_data(tmp_path):
    """A value the constructors accept but the forward rejects fails in one line, as in mode=train."""
    proc = run_cli([*PRETRAIN, "model.norm.eps=bogus"], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = nonempty_lines(proc.stderr)
    assert line.startswith("error: model: the configured model cannot run a forward pass"), line
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before anything was trained


def test_load_rebuilds_the_trained_model_and_its_data(tmp_path):
    run_cli(["data=synthetic", *TINY_MODEL, "trainer.max_epochs=1", "trainer.progress_bar=false",
             "viz.enabled_at_end=false", "logger=none", "data.normalization=auto"], tmp_path)
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    model = vitsweep.load(best)
    assert not model.training and model.embed_dim == 32
    stored = torch.load(best, weights_only=True)["model"]
    assert all(torch.equal(value, stored[name]) for name, value in model.state_dict().items())
    model, data = vitsweep.load(best, data=True)
    summary = read_summary(tmp_path / "run")
    assert data.normalization_stats() == pytest.approx(summary["normalization"])  # the run's own statistics
    images, labels = next(iter(data.eval_batches("test")))
    with torch.no_grad():
        accuracy = (model(data.normalize(images)).argmax(1) == labels).float().mean().item()
    assert accuracy == pytest.approx(summary["metrics"]["test/acc"], abs=1 / len(labels))


def test_load_refuses_a_checkpoint_without_a_config_in_one_line(tmp_path):
    path = tmp_path / "bare.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match="stores no config"):
        vitsweep.load(path)
