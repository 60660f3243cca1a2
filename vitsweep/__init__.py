"""vitsweep: a Hydra-configured research harness for Vision Transformers (README.md, docs/architecture.md).

From Python, a trained run's model (and, on request, its data module and normalization):

    import vitsweep
    model = vitsweep.load("outputs/runs/.../checkpoints/best.pt")
    model, data = vitsweep.load(path, data=True)     # data.normalize(images), data.mean, data.std
"""


def load(ckpt_path, data: bool = False, device="cpu"):
    """The trained model of a checkpoint written by run.py, rebuilt from the config it stores, in eval mode
    (vitsweep.run.build.load). Imported here on first use, so `import vitsweep` stays light."""
    from vitsweep.run.build import load as load_checkpointed

    return load_checkpointed(ckpt_path, data=data, device=device)
