"""Checkpoints: written atomically and durably (vitsweep.logger.atomic_file), read with
`torch.load(weights_only=True)`.

Everything in a checkpoint is a tensor, a number, a string or a container of those (RNG states are
converted), so loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from vitsweep.logger.atomic_file import write_atomic

log = logging.getLogger(__name__)


def capture_rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate((3, tuple(state["python"][0]), state["python"][1]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a crash or a full disk mid-write never
    damages the checkpoint that was already there, and a failed write leaves no temp file (OutputWriteError)."""
    write_atomic(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path, map_location="cpu", mmap: bool = False) -> dict:
    """The checkpoint at `path`; `mmap`: tensors stay on the disk until read (a cheap look at its config)."""
    path = Path(str(path)).expanduser()  # str: a number on the command line (ckpt_path=1) is a path too
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={path} does not exist: pass the path of a last.pt or best.pt")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 -- corrupt, truncated, a text or YAML file: none is a checkpoint
        raise ValueError(f"ckpt_path={path} is not a readable vitsweep checkpoint ({type(err).__name__}): "
                         f"pass a last.pt or best.pt written by run.py") from None
    if not isinstance(payload, dict) or "model" not in payload:
        raise ValueError(f"ckpt_path={path} holds no 'model' state dict: pass a last.pt or best.pt written by run.py")
    return payload


def check_architecture(model: torch.nn.Module, state_dict: dict, ckpt_path) -> None:
    """Fail with one line when a checkpoint was written by a model of another shape."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
                  for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or mismatched:
        detail = "; ".join(filter(None, [
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
            f"shape {', '.join(mismatched[:2])}" if mismatched else "",
        ]))
        raise ValueError(f"ckpt_path={ckpt_path} was written by a model of another architecture ({detail}): "
                         f"use the same model and data config as the run that wrote it")


def restore(model: torch.nn.Module, path: str | Path, map_location="cpu", checkpoint: dict | None = None) -> dict:
    """Load the checkpoint at `path` (or take `checkpoint`, already read from it), check that `model` has
    its architecture, and load its weights into `model`. Returns the whole checkpoint (optimizer,
    scheduler, RNG states, config, task state, ...)."""
    checkpoint = checkpoint if checkpoint is not None else load_checkpoint(path, map_location=map_location)
    check_architecture(model, checkpoint["model"], path)
    model.load_state_dict(checkpoint["model"])
    return checkpoint
