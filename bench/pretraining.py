"""Pretraining then fine-tuning vs fine-tuning from scratch, in the same total CPU minutes.

On a class-per-folder tree (CIFAR-10 as JPEGs), the same ViT (model=vit_cpu, augment=basic) either
    pretrain   `mode=pretrain pretrain=<method>` for --pretrain-minutes (labels ignored; the kNN monitor
               reads the val labels only to pick best.pt), then fine-tunes every tensor from its best.pt
               (`model.pretrained=<best.pt>`, `model.trainable=all`) for --finetune-minutes, or
    scratch    trains from a random init for --pretrain-minutes + --finetune-minutes,
each `python run.py` job stopped by `trainer.max_time`, then scored on the test split with its best
checkpoint. Decoding the folder into the cache happens once, before either, and is charged to neither.
Each arm's cosine schedule (warmup 0.1 epoch) runs over its --*-epochs: pick them to about fill the minutes.

    python bench/pretraining.py --root ~/datasets/cifar10-jpeg --pretrain-minutes 3 --finetune-minutes 3
    taskset -c 1 python bench/pretraining.py --root ~/datasets/cifar10-jpeg --threads 1 ...   # one core of two

On a machine shared with other work, pin the bench to a core of its own (taskset) with --threads 1: both
arms then get the same CPU minutes, whatever runs on the other cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def run(root: Path, args: list[str], job_dir: Path, workdir: Path, cache_dir: Path, minutes: float, epochs: int,
        threads: int | None) -> dict:
    """One `python run.py` job of `minutes` of training; its summary.json and the job's wall seconds."""
    cmd = [sys.executable, str(ROOT / "run.py"), "data=imagefolder", f"data.root={root}", "data.image_size=32",
           f"data.mean={MEAN}", f"data.std={STD}", "model=vit_cpu", "augment=basic", f"trainer.max_epochs={epochs}", "scheduler.warmup_epochs=0.1",
           f"trainer.max_time={minutes * 60}", "trainer.progress_bar=false", "logger=none",
           "viz.enabled_at_end=false", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={job_dir}",
           *([f"threads={threads}"] if threads else []), *args]
    start = time.time()
    subprocess.run(cmd, check=True, cwd=workdir)
    summary = json.loads((job_dir / "summary.json").read_text())
    return {**summary, "job_s": time.time() - start}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--method", choices=["mae", "dino"], default="mae")
    parser.add_argument("--pretrain-minutes", type=float, default=1.0)
    parser.add_argument("--finetune-minutes", type=float, default=1.0)
    parser.add_argument("--pretrain-epochs", type=int, default=1, help="the pretraining's cosine schedule length")
    parser.add_argument("--finetune-epochs", type=int, default=1, help="the fine-tuning's schedule length")
    parser.add_argument("--scratch-epochs", type=int, default=2, help="the from-scratch run's schedule length")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "vitsweep-bench",
                        help="decoded images, kept between runs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per job (default: all cores)")
    args = parser.parse_args()
    root = args.root.expanduser()

    from vitsweep.data.imagefolder import load_imagefolder
    start = time.time()
    load_imagefolder(str(root), 32, 3, cache_dir=str(args.cache_dir))
    print(f"decoded (or read from the cache) in {time.time() - start:.0f}s, charged to neither arm", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pretrain = run(root, ["mode=pretrain", f"pretrain={args.method}"], tmp / "pretrain", tmp, args.cache_dir,
                       args.pretrain_minutes, args.pretrain_epochs, args.threads)
        best = tmp / "pretrain" / "checkpoints" / "best.pt"
        finetune = run(root, [f"model.pretrained={best}", "model.trainable=all"], tmp / "finetune", tmp, args.cache_dir,
                       args.finetune_minutes, args.finetune_epochs, args.threads)
        scratch = run(root, [], tmp / "scratch", tmp, args.cache_dir, args.pretrain_minutes + args.finetune_minutes,
                      args.scratch_epochs, args.threads)

    report = finetune["pretrained"]
    print(f"pretrain={args.method}: {pretrain['steps']} steps, {pretrain['epochs_completed']} epochs, "
          f"best {pretrain['monitor']} {pretrain['best_value']:.4f}; loaded {report['num_loaded']} tensors, "
          f"{report['num_missing_encoder']} encoder tensors missing")
    minutes = args.pretrain_minutes + args.finetune_minutes
    rows = [(f"{args.method} {args.pretrain_minutes:g} + fine-tune {args.finetune_minutes:g} min", finetune,
             pretrain["job_s"] + finetune["job_s"]),
            (f"scratch {minutes:g} min", scratch, scratch["job_s"])]
    for name, summary, job_s in rows:
        print(f"{name:32s} test/acc {summary['metrics']['test/acc']:.4f}  fine-tune steps {summary['steps']:6d}  "
              f"jobs' wall {job_s:.0f}s")
    difference = finetune["metrics"]["test/acc"] - scratch["metrics"]["test/acc"]
    print(f"difference (pretrained - scratch): {difference * 100:+.2f} points of test accuracy")


if __name__ == "__main__":
    main()
