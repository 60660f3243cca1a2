"""Datasets decoded once into uint8 tensors, and the DataModule that batches them on the device."""

from vitsweep.data.datamodule import DataModule
from vitsweep.data.splits import Split, Splits

__all__ = ["DataModule", "Split", "Splits"]
