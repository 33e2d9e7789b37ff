"""The one training loop (finetuning and unlearning), its configuration, batching, optimizer and the
frozen start model; single process, DDP or DeepSpeed ZeRO-3 through accelerate.

Imports only from the floors below (``harness.data``, the plugin API, the ground floor).
"""

from harness.training.batching import collate, epoch_order, pairing_generator
from harness.training.config import TrainConfig, config_dict, plan
from harness.training.loop import finetune, method_uses_reference, save_model, unlearn
from harness.training.optim import build_optimizer, build_scheduler
from harness.training.prepare import Preparation
from harness.training.start_model import StartModel

__all__ = ["Preparation", "StartModel", "TrainConfig", "build_optimizer", "build_scheduler", "collate", "config_dict",
           "epoch_order", "finetune", "method_uses_reference", "pairing_generator", "plan", "save_model",
           "unlearn"]
