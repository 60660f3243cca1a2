"""Train, evaluate or sweep a Vision Transformer.

    python run.py                                   # digits, offline, in a minute
    python run.py data=cifar10 model=vit_tiny
    python run.py mode=eval ckpt_path=outputs/runs/.../checkpoints/best.pt
    python run.py -m optimizer.lr=1e-3,3e-4 model.depth=4,6
    python run.py --help                            # the config groups
    torchrun --nproc_per_node=4 run.py data=cifar10 model=vit_tiny   # data-parallel (docs/scale.md)
"""

import os
import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from vitsweep.run.modes import run  # imported here so `--help` and config errors answer instantly

    return run(cfg)


if __name__ == "__main__":
    if int(os.environ.get("RANK", "0")) > 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun's other ranks never compose a config nor make a job dir: rank 0 shares its job with them
        from vitsweep.run.modes import follow_rank0

        follow_rank0()
        sys.exit(0)
    main()
