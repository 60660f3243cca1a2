"""What a run costs, for the `cost` block of summary.json (docs/outputs.md) and the W&B summary:
parameters, forward FLOPs per image, training images/s, peak memory, and where the wall time went.

FLOPs are torch's own count (`torch.utils.flop_counter`, 2 per multiply-add, matmuls, convolutions
and attention; norms, activations and softmax are not counted), taken on the `meta` device: no
arithmetic runs, no memory is allocated, and scaled_dot_product_attention is counted on any machine
(the CPU flash kernel has no FLOP formula in the counter; its meta path does).
"""

from __future__ import annotations

import copy
import resource
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

PARTS = ("data", "train", "eval", "other")


class WallClock:
    """Charges each lap, the time since the previous one, to a part of the job: `data` (reading and
    preparing the dataset, fetching and augmenting batches), `train` (forward, backward, optimizer
    step), `eval` (validation and test passes), `other` (start-up, checkpoints, figures). On CUDA the
    host does not wait for queued kernels, so device time lands in the part where the host next syncs
    (each log window and epoch end: train)."""

    def __init__(self):
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self._last = time.perf_counter()

    def lap(self, part: str) -> float:
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        self.seconds[part] += seconds
        return seconds


def forward_flops(model: torch.nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass of one (C, H, W) image through `model` in eval mode: counted on a copy whose
    tensors are on `meta` (no memory, no values), made by deepcopy with every tensor mapped to its meta
    stand-in beforehand, so shared modules (model/sharing) stay shared and the model itself is untouched."""
    memo = {id(tensor): (torch.nn.Parameter(torch.empty_like(tensor, device="meta"), tensor.requires_grad)
                         if isinstance(tensor, torch.nn.Parameter) else torch.empty_like(tensor, device="meta"))
            for tensor in [*model.parameters(), *model.buffers()]}
    meta_model = copy.deepcopy(model, memo).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta_model(torch.zeros(1, *input_shape, device="meta"))
    return counter.get_total_flops()


def gflops(flops: int | None) -> float | None:
    """FLOPs in units of 10^9, to 6 significant digits (a tiny test model has a few hundred thousand);
    None when they were not counted."""
    return None if flops is None else float(f"{flops / 1e9:.6g}")


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(MiB, what was measured): the CUDA caching allocator's peak, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10), "process_peak_rss"


def run_cost(num_params: int, flops_per_image: int | None, train_images: int, clock: WallClock,
             device: torch.device) -> dict:
    """The summary's `cost` block (docs/outputs.md): numbers, and what the peak memory measured."""
    memory_mib, memory_kind = peak_memory(device)
    step_seconds = clock.seconds["data"] + clock.seconds["train"]
    return {
        "params": num_params,
        "gflops_per_image": gflops(flops_per_image),
        "train_images_per_s": round(train_images / step_seconds, 1) if step_seconds > 0 else None,
        "peak_memory_mib": round(memory_mib, 1),
        "peak_memory_kind": memory_kind,
        **{f"time_{part}_s": round(seconds, 2) for part, seconds in clock.seconds.items()},
    }
