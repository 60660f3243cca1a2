"""The training loop and its checkpoints: the trainer config group."""

from vitsweep.trainer.loop import Trainer

__all__ = ["Trainer"]
