"""TensorBoard event files in `<job dir>/tensorboard`."""

from __future__ import annotations

from pathlib import Path


class TensorBoardLogger:
    def __init__(self, subdir: str = "tensorboard"):
        self.subdir, self.writer = subdir, None

    def start(self, config: dict, job, job_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(job_dir) / self.subdir))
        self.writer.add_text("config", "\n".join(f"    {line}" for line in _flat_lines(config)))

    def log(self, metrics: dict, step: int, epoch: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        from torchvision.io import ImageReadMode, decode_image

        for name, path in images.items():
            self.writer.add_image(name, decode_image(str(path), mode=ImageReadMode.RGB), global_step=step)

    def finish(self, summary: dict, exit_code: int) -> None:
        if self.writer is not None:
            self.writer.close()


def _flat_lines(config: dict, prefix: str = ""):
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _flat_lines(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}: {value}"
