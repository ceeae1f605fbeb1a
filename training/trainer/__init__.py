"""Training NExT-GPT: the three official stages on accelerate.

- `data`: the official data formats (pair JSON for stages 1–2, T2M / MosIT dialog JSON for
  stage 3), validated with `DataError` (file, record index, field).
- `encode`: dialogs → token ids, labels (assistant tokens only), media slots, signal-token groups.
- `targets`: the precomputed decoder text embeddings the output projectors learn (`TargetCache`).
- `rows`: the 38 new token rows as separate trainable parameters (the full matrices stay frozen).
- `trainer`: `TrainConfig`, `Trainer` (loss, optimizer, checkpoints, resume, data-parallel).
- `export`: our checkpoint → the official `pytorch_model.pt` key layout.

The trainer never runs a decoder: the stage driver (`training/stages.py`) computes the targets with the
decoder tools and passes them in.
"""

from training.trainer.data import DataError, Dialog, Output, Pair, Turn, load_stage_data, read_dialogs_file, read_pairs_file
from training.trainer.encode import Collator, DialogEncoder, Example, TemplateError, align_target, isolate_later_groups, restated_dialogs
from training.trainer.targets import TargetCache, caption_key
from training.trainer.trainer import STAGE_GROUPS, TrainConfig, Trainer, TrainError, TrainResult, make_accelerator

__all__ = [
    "STAGE_GROUPS",
    "Collator",
    "DataError",
    "Dialog",
    "DialogEncoder",
    "Example",
    "Output",
    "Pair",
    "TargetCache",
    "TemplateError",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "Trainer",
    "Turn",
    "align_target",
    "caption_key",
    "isolate_later_groups",
    "restated_dialogs",
    "load_stage_data",
    "make_accelerator",
    "read_dialogs_file",
    "read_pairs_file",
]
