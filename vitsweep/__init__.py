"""vitsweep: a Hydra-configured research harness for Vision Transformers."""
