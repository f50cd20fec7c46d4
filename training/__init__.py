"""SAE training on an activation store: one loop for one process, DDP (torchrun) and latent-sharded
SAEs (DeviceMesh / DTensor), full-state checkpoints, logging, and ``llama3-sae eval``.

    llama3-sae train --store STORE --out SAE_DIR [--n-latents N --k K --batch-size B --steps S --lr LR]
    torchrun --nproc-per-node N -m training --store STORE --out SAE_DIR [--model-parallel M]
    llama3-sae eval --sae SAE_DIR [SAE_DIR ...] --ckpt-dir CKPT --data HELDOUT.txt --out EVAL_DIR

From Python: ``run_train(TrainConfig(store=..., out=...))``.
"""

from .cli import main_eval, main_train
from .config import TrainConfig
from .loop import Trainer, TrainResult
from .run import run_train

__all__ = ["TrainConfig", "TrainResult", "Trainer", "main_eval", "main_train", "run_train"]
