"""Self-supervised pretraining of the ViT encoder: the pretrain config group (conf/pretrain/), run by
`python run.py mode=pretrain pretrain=mae|dino`. A method gives the loop a model (the encoder plus what
the method trains around it) and answers the loop's calls as a task does (objective.py); the encoder in
its best.pt is what `model.pretrained=<best.pt>` loads into any task for fine-tuning."""

from vitsweep.pretrain.dino import DINO
from vitsweep.pretrain.mae import MAE
from vitsweep.pretrain.objective import Pretraining

ENCODER_PREFIX = "encoder."  # a pretrain checkpoint's encoder tensors: the MAE encoder, DINO's teacher

__all__ = ["DINO", "ENCODER_PREFIX", "MAE", "Pretraining"]
