"""Train, evaluate or sweep a Vision Transformer.

    python run.py                                   # digits, offline, in a minute
    python run.py data=cifar10 model=vit_tiny
    python run.py mode=eval ckpt_path=outputs/runs/.../checkpoints/best.pt
    python run.py -m optimizer.lr=1e-3,3e-4 model.depth=4,6
    python run.py --help                            # the config groups
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from vitsweep.modes import run  # imported here so `--help` and config errors answer instantly

    return run(cfg)


if __name__ == "__main__":
    main()
