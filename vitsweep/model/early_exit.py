"""Early exit (dynamic depth): classifier heads after chosen blocks; at eval a sample leaves at the first
one that is confident enough, so easy images run fewer blocks.

    training    every exit head and the final head predict: the model returns {"out": (B, K) final logits,
                "early_exits": (E, B, K)}, and the task adds `loss_weight` x each exit's loss to the
                final head's (vitsweep.task.task.Task.training_loss)
    eval        per sample, the logits of the first exit whose confidence EXCEEDS `threshold` (strictly),
                else the final head's; a sample that has left drops out of the batch, so the later
                blocks run on the samples still left only, and none once all have left (the saving)

Confidence is the max softmax probability (`criterion: max_prob`, BranchyNet / Shallow-Deep Networks) or
one minus the normalized entropy, 1 - H(p) / log(K) (`criterion: entropy`); both lie in [0, 1], so
threshold 1.0 never exits early (the full model) and threshold 0 exits every sample at the first exit.

An exit head is a LayerNorm and a Linear on the pooled token of its block's output: the cls token, or
the mean of the patch tokens with model.pooling=mean (pooling.py, as the final head pools).

It plugs into the trunk's loop (hooks.py) after a block (`after_block`: the exit head; at eval the samples
that leave drop out of the batch, and the loop ends once none is left) and at the output (`output`: each
sample's logits from where it left). It needs single images and class logits from the linear head
(compat.py refuses temporal, metadata and task heads with it); the frames of a time series given to it
(model/temporal=none) are read as images of their own, one output per frame, as at 5462088.

To score every exit (per-exit accuracy, the share leaving at each, the mean depth) an eval forward must
run all blocks and keep every head's logits; `record_exits(model)` does that:

    with record_exits(model) as exits:
        logits = model(images)      # (B, K): the early-exited predictions, as without recording
    exits.logits                    # (E+1, B, K): every exit's logits, the final head's last
    exits.index                     # (B,): where each sample left (E: the final head)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from vitsweep.model.compat import CLASS_LOGITS, SINGLE_IMAGES
from vitsweep.model.hooks import TrunkOption, TrunkPass
from vitsweep.model.pooling import pool_tokens

CRITERIA = ("max_prob", "entropy")


class NoEarlyExit(TrunkOption):
    """model/early_exit=none: every sample runs every block."""

    blocks: tuple[int, ...] = ()

    def __init__(self, depth: int, dim: int, num_classes: int, pooling: str, num_prefix_tokens: int):
        super().__init__()


@dataclass
class ExitRecord:
    """What one recorded eval forward did (see record_exits)."""

    logits: torch.Tensor | None = None  # (E+1, B, K), the final head's last
    index: torch.Tensor | None = None  # (B,) long: the exit each sample left at; E = the final head


@dataclass
class ExitPass:
    """One forward's exits so far (TrunkPass.notes["early_exit"])."""

    drop_out: bool  # samples leave the batch at their exit (eval, not recording, real values)
    running: torch.Tensor  # (R,) the batch indices of the samples still in the blocks
    out: torch.Tensor | None = None  # (B, K) each sample's logits from where it left (drop_out)
    exit_logits: list[torch.Tensor] = field(default_factory=list)  # (B, K) of each exit (training, recording)


class ExitHead(nn.Module):
    def __init__(self, dim: int, num_classes: int, pooling: str, num_prefix_tokens: int):
        super().__init__()
        self.pooling, self.num_prefix_tokens = pooling, num_prefix_tokens
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, tokens):  # (B, N, D) -> (B, K)
        return self.fc(self.norm(pool_tokens(tokens, self.pooling, self.num_prefix_tokens)))


class ConfidenceExit(NoEarlyExit):
    """model/early_exit=confidence: exit heads after `blocks`, leaving at the first one whose confidence
    (`criterion`) exceeds `threshold`; each exit's loss weighted by `loss_weight` in training."""

    name = "confidence"
    needs = frozenset({SINGLE_IMAGES, CLASS_LOGITS})

    def __init__(self, blocks: Sequence[int] | None = None, threshold: float = 0.9, criterion: str = "max_prob",
                 loss_weight: float = 1.0, *, depth: int, dim: int, num_classes: int, pooling: str,
                 num_prefix_tokens: int):
        super().__init__(depth, dim, num_classes, pooling, num_prefix_tokens)
        if blocks is None:  # a third and two thirds of the way, never the last block (the final head is there)
            blocks = sorted({depth // 3, 2 * depth // 3} - {depth - 1})
        blocks = [int(b) for b in blocks]
        if not blocks or any(not 0 <= b < depth - 1 for b in blocks) or len(set(blocks)) != len(blocks):
            room = f"pick distinct 0-based block indices in [0, {depth - 2}]" if depth > 1 else "use model.depth >= 2"
            raise ValueError(f"model.early_exit.blocks={blocks} does not fit model.depth={depth} (the final head sits "
                             f"after the last block): {room}")
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"model.early_exit.threshold={threshold} is a confidence: pick a value in [0, 1] "
                             f"(1.0 never exits early, 0 always at the first exit)")
        if criterion not in CRITERIA:
            raise ValueError(f"model.early_exit.criterion={criterion!r} is not one of: {', '.join(CRITERIA)}")
        if not float(loss_weight) >= 0:
            raise ValueError(f"model.early_exit.loss_weight={loss_weight} must be >= 0")
        self.blocks = tuple(sorted(blocks))
        self.threshold, self.criterion, self.loss_weight = float(threshold), criterion, float(loss_weight)
        self.layers = [b + 1 for b in self.blocks] + [depth]  # blocks run by a sample leaving at each exit
        self.heads = nn.ModuleDict({str(b): ExitHead(dim, num_classes, pooling, num_prefix_tokens)
                                    for b in self.blocks})
        self.recorder: ExitRecord | None = None  # set by record_exits()

    def head(self, block: int, tokens: torch.Tensor) -> torch.Tensor:
        """The exit logits (B, K) after `block` from its output tokens (B, N, D)."""
        return self.heads[str(block)](tokens)

    def confidence(self, logits: torch.Tensor) -> torch.Tensor:  # (..., K) -> (...) in [0, 1]
        probs = logits.float().softmax(dim=-1)
        if self.criterion == "max_prob":
            return probs.amax(dim=-1)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)
        return 1 - entropy / math.log(logits.shape[-1])

    def after_block(self, layer: int, tokens: torch.Tensor, run: TrunkPass) -> torch.Tensor:
        """After an exit's block, its logits: kept (training, recording), or at eval the samples whose exit
        is confident leave with them, and the tokens (R, N, D) of those still running go on (R' <= R)."""
        if layer not in self.blocks:
            return tokens
        logits = self.head(layer, tokens)  # (R, K)
        if "early_exit" not in run.notes:  # the first exit: every sample still running
            # samples drop out as they leave: at eval, unless record_exits wants every exit (or on the meta
            # device, the FLOP count: no values to decide on, the whole depth, the worst case)
            drop_out = not self.training and self.recorder is None and not tokens.is_meta
            run.notes["early_exit"] = ExitPass(drop_out, torch.arange(tokens.shape[0], device=tokens.device))
        exits = run.notes["early_exit"]
        if not exits.drop_out:
            exits.exit_logits.append(logits)
            return tokens
        if exits.out is None:
            exits.out = logits.new_empty(len(exits.running), logits.shape[1])
        leaving = self.confidence(logits) > self.threshold  # (R,)
        if not leaving.any():
            return tokens
        exits.out[exits.running[leaving]] = logits[leaving]
        staying = ~leaving
        exits.running = exits.running[staying]
        run.size = None if run.size is None else run.size[staying]
        return tokens[staying]  # (R', N, D)

    def output(self, out: torch.Tensor, run: TrunkPass):
        """The final head's logits (R, K) of the samples that ran every block -> the model's output."""
        exits = run.notes["early_exit"]
        if exits.drop_out:
            exits.out[exits.running] = out  # the final head takes whoever is left
            return exits.out
        return self.decide(exits.exit_logits, out)

    def decide(self, exit_logits: list[torch.Tensor], final_logits: torch.Tensor):
        """The forward's result from every exit's logits and the final head's, all (B, K): the training dict,
        or each sample's first confident exit (B, K) at eval, recorded under record_exits."""
        if self.training:
            return {"out": final_logits, "early_exits": torch.stack(exit_logits)}  # (B, K), (E, B, K)
        stacked = torch.stack([*exit_logits, final_logits])  # (E+1, B, K)
        passed = self.confidence(stacked) > self.threshold  # (E+1, B)
        passed[-1] = True  # the final head takes whoever is left
        index = passed.int().argmax(dim=0)  # (B,) the first True
        if self.recorder is not None:
            self.recorder.logits, self.recorder.index = stacked, index
        return stacked[index, torch.arange(stacked.shape[1], device=stacked.device)]  # (B, K)


@contextmanager
def record_exits(model: nn.Module) -> Iterator[ExitRecord | None]:
    """Within the block, eval forwards of `model` (or any module holding a ConfidenceExit: DDP, EMA copy)
    run every block and record every exit's logits and each sample's exit (an ExitRecord, the last
    forward's). Yields None for a model without early exit."""
    exits = [m for m in model.modules() if isinstance(m, ConfidenceExit)]
    if not exits:
        yield None
        return
    record = ExitRecord()
    for m in exits:
        m.recorder = record
    try:
        yield record
    finally:
        for m in exits:
            m.recorder = None


def exit_outputs(logits: torch.Tensor, record: ExitRecord | None):
    """The eval outputs that the task's evaluator scores: `logits` (B, K) alone without early exit, else
    {"out": logits, "exit_logits": (B, E+1, K), "exit_taken": (B, E+1) one-hot of where each sample left}.
    Batch first, so that views average (data.eval_crop=tiled: shares become fractions) and ranks gather."""
    if record is None:
        return logits
    taken = torch.nn.functional.one_hot(record.index, record.logits.shape[0]).to(logits.dtype)  # (B, E+1)
    return {"out": logits, "exit_logits": record.logits.transpose(0, 1).to(logits.dtype), "exit_taken": taken}
