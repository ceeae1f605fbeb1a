"""The NExT-GPT training loop on Hugging Face accelerate (CPU, one GPU, data-parallel, DeepSpeed).

    stage 1  encoding-side alignment   X-caption pairs   input_proj + new token rows
    stage 2  decoding-side alignment   captions          output projectors + new token rows
    stage 3  instruction tuning        dialogs           LoRA + input_proj + projectors + new rows

loss = LM cross-entropy over the assistant tokens
     + Σ_modality loss_scale[m] × mean over signal groups and query tokens of ‖proj(states) − target‖₂
where `states` are the last-layer hidden states at the N signal tokens plus those tokens' input
embeddings (what `NextGPT.generate` feeds the projector) and `target` is the decoder's own
text-encoder output for the output's caption (precomputed; see `targets.py`). The optional
noise-prediction loss through the frozen diffusion UNet (the later NExT-GPT rewrite) is not
implemented: the released v0 weights were trained without it.

Launch with plain `python` (one process) or `accelerate launch` (data-parallel; gloo on CPU, NCCL on
GPUs; `--use_deepspeed --deepspeed_config_file configs/deepspeed_zero2.json` for ZeRO-2 fp16).

Output directory:

    OUT/                         the final checkpoint (`nextgpt-checkpoint/1`: set it as a profile's
      nextgpt.safetensors        `checkpoint`): input_proj.*, output_projectors.<m>.*,
      adapter/                   embed_tokens.new_rows, lm_head.new_rows; peft LoRA adapter (stage 3)
      meta.json  trainer.json  metrics.jsonl
      profile.txt                with `profile_steps`: where the time of those steps went
      checkpoints/step-000100/   the same files + trainer_state/ (optimizer and RNG: accelerate's
                                 save_state without the frozen model; step and scheduler:
                                 progress.json) → --resume, which never unpickles: every file is
                                 read with torch.load(weights_only=True) or as JSON
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from nextgpt.checkpoint import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS, FORMAT, META_FILE, WEIGHTS_FILE
from nextgpt.model import Forward, signal_forward
from nextgpt.tokens import MODALITIES
from training.trainer.data import Dialog
from training.trainer.encode import IGNORE, Collator, DialogEncoder, Example, MediaCache
from training.trainer.rows import N_NEW, NewRows

GROUPS = ("input_proj", "output_projectors", "new_rows", "embed_rows", "lora")  # embed_rows: the input side of new_rows only
STAGE_GROUPS = {
    1: ("input_proj", "new_rows"),
    2: ("output_projectors", "new_rows"),
    3: ("lora", "input_proj", "output_projectors", "new_rows"),
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
CHECKPOINTS = "checkpoints"
STATE_DIR = "trainer_state"
COMPLETE = "complete"  # written last into STATE_DIR
TRAINER_FILE = "trainer.json"
PROGRESS_FILE = "progress.json"  # in STATE_DIR: the step and the LR scheduler's state
METRICS_FILE = "metrics.jsonl"
PROFILE_FILE = "profile.txt"
CALIBRATE_STEPS = 10  # max_minutes: the pace is measured over these steps after the first


class TrainError(RuntimeError):
    """A training run that cannot start or continue; the message says why."""


@dataclass
class TrainConfig:
    stage: int
    output_dir: Path
    train: tuple[str, ...] | None = None  # parameter groups; None = the stage's (STAGE_GROUPS)
    max_steps: int | None = None  # optimizer steps; None = `epochs` passes over the data
    max_minutes: float | None = None  # time budget: after CALIBRATE_STEPS steps the step count is cut to what fits (the LR decay follows)
    epochs: float = 1.0
    batch_size: int = 4  # per process
    grad_accum: int = 1
    lr: float = 5e-4  # official: Adam, warmup to 5e-4 then decay
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 1e-3  # on matrices (new rows included), not on biases / 1-d tensors
    warmup_steps: int = 10
    grad_clip: float | None = 1.0
    max_length: int = 512
    group_by_length: int = 0  # > 0: batches of similar length, sorted within windows of this many batches (EpochSampler)
    lora_r: int = 32
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = LORA_TARGETS
    loss_scale: dict[str, float] | None = None  # default 1 each; stage 3: video 2 (official)
    save_every: int | None = None  # also saves at the end
    log_every: int = 10
    seed: int = 0
    progress: bool = True
    resume: str | Path | None = None  # "latest" or a checkpoints/step-* directory
    overwrite: bool = False
    gradient_checkpointing: bool = False
    dump_rank_state: bool = False  # each process writes its trainable tensors to OUT/rank-<i>.safetensors
    profile_steps: int = 0  # torch.profiler over this many steps after the first: OUT/profile.txt (main process)

    def __post_init__(self):
        if self.stage not in STAGE_GROUPS:
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage!r}")
        self.output_dir = Path(self.output_dir).expanduser()
        groups = tuple(self.train) if self.train is not None else STAGE_GROUPS[self.stage]
        unknown = sorted(set(groups) - set(GROUPS))
        if unknown:
            raise ValueError(f"unknown parameter group(s) {', '.join(unknown)}; known: {', '.join(GROUPS)}")
        if not groups:
            raise ValueError("nothing to train: no parameter group selected")
        self.train = tuple(g for g in GROUPS if g in groups)
        scale = {m: 1.0 for m in MODALITIES}
        if self.stage == 3:
            scale["video"] = 2.0
        scale.update(self.loss_scale or {})
        unknown = sorted(set(scale) - set(MODALITIES))
        if unknown:
            raise ValueError(f"loss_scale: unknown modality {', '.join(unknown)}")
        self.loss_scale = scale
        for name in ("batch_size", "grad_accum", "max_length", "lora_r", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.group_by_length < 0:
            raise ValueError("group_by_length must be 0 (off) or a number of batches")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be at least 1")
        if self.save_every is not None and self.save_every < 1:
            raise ValueError("save_every must be at least 1")
        if self.profile_steps < 0:
            raise ValueError("profile_steps must be 0 (off) or a number of steps")


@dataclass
class TrainResult:
    step: int
    output_dir: Path
    losses: list[float]  # per optimizer step, averaged over processes and accumulation
    trainable: int
    total: int
    examples: int
    metrics: list[dict] = field(default_factory=list)


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (x86 AVX512-BF16 / AMX; Arm BF16); True where unknown."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return True
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"}) or not flags & {"avx2", "avx", "sse2", "asimd"}


def make_accelerator(grad_accum: int = 1, mixed_precision: str | None = None, cpu: bool | None = None,
                     find_unused_parameters: bool = True):  # fmt: skip
    """An Accelerator set up for this trainer. `find_unused_parameters` (DDP) is needed when a batch
    can leave some trainable parameter unused: a modality's projector with no output of that
    modality in the batch, the input projection with no media (stages 2–3); stage 1 needs none.

    Data-parallel on CPU: accelerate only sets up gloo when told to use the CPU, and `accelerate
    launch --cpu` starts ONE process unless an MPI hostfile is given; so when several processes were
    started by torchrun (`accelerate launch --multi_gpu --num_processes N`, `torchrun`) on a machine
    without CUDA, the CPU is chosen here automatically."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if cpu is None and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        cpu = True
    if mixed_precision == "bf16" and (cpu or not torch.cuda.is_available()) and not cpu_has_bf16():
        warnings.warn("bf16 on a CPU without AVX512-BF16 or AMX runs its matrix products in a slow fallback "
                      "(measured here on an AVX2 CPU: 220 s a step against 11 s in fp32); leave mixed precision off",
                      stacklevel=2)  # fmt: skip
    kwargs = {}
    if mixed_precision is not None:
        kwargs["mixed_precision"] = mixed_precision
    if cpu is not None:
        kwargs["cpu"] = cpu
    from accelerate.state import AcceleratorState

    was = AcceleratorState._shared_state.get("_mixed_precision")
    if was is not None and mixed_precision is not None and was != mixed_precision:
        # an earlier stage in this process (training.small: stages 1-2 in fp32, 3-9 with --bf16) chose another
        # precision; accelerate keeps it process-wide and refuses a change: start its state over (the process
        # group, PartialState, is kept)
        AcceleratorState._reset_state()
    return Accelerator(
        gradient_accumulation_steps=grad_accum,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
        **kwargs,
    )


class EpochSampler(torch.utils.data.Sampler):
    """A permutation per epoch, a function of (seed, epoch) only, identical on every process
    (accelerate then hands each process its share of the batches). The epoch is set by the
    trainer (`use_epoch`), not by accelerate, so that resuming mid-epoch replays the same order.

    With `lengths` and `group` > 0, batches are of similar length (as transformers' `group_by_length`):
    each window of `group` × `batch_size` examples of the permutation is sorted by length and cut into
    batches, and the batches are shuffled; a batch is then padded to about its own examples' length
    instead of the longest of a random draw.
    Every example is still seen once per epoch; a short last batch stays last."""

    def __init__(self, n: int, seed: int, lengths: Sequence[int] | None = None, batch_size: int = 1, group: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0
        self.lengths, self.batch_size, self.group = lengths, batch_size, group

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        if not self.group or self.lengths is None:
            return iter(order)
        window, bs = self.group * self.batch_size, self.batch_size
        batches = []
        for w in range(0, self.n, window):
            part = sorted(order[w : w + window], key=self.lengths.__getitem__)
            batches += [part[i : i + bs] for i in range(0, len(part), bs)]
        short = batches.pop() if batches and len(batches[-1]) < bs else []  # only the last window can end short
        return iter([i for k in torch.randperm(len(batches), generator=g).tolist() for i in batches[k]] + short)


class Progress:
    """Where training stands; saved as JSON beside accelerate's state (PROGRESS_FILE)."""

    def __init__(self):
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.batch_in_epoch = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])


class TrainModule(nn.Module):
    """The trainable graph: LLM (frozen, + LoRA / new rows), input projection, output projectors."""

    def __init__(self, llm, input_proj, output_projectors, loss_scale: dict[str, float]):
        super().__init__()
        self.llm = llm
        self.input_proj = input_proj
        self.output_projectors = output_projectors
        self.loss_scale = dict(loss_scale)

    def run(self, batch: dict, logits_at: torch.Tensor | None = None) -> Forward:
        """The batch through `signal_forward` (as `NextGPT.generate` and the refit run it): media spliced
        into their slots → LLM → logits (at `logits_at`, else everywhere) and the signal states of every
        group in the batch."""
        groups = {m: (g["batch"], g["start"]) for m, g in (batch.get("signals") or {}).items()}
        return signal_forward(self.llm, self.input_proj, batch["input_ids"], attention_mask=batch["attention_mask"],
                              media_vectors=batch["media_vectors"], media_batch=batch["media_batch"],
                              media_pos=batch["media_pos"], signals=groups, logits_at=logits_at)  # fmt: skip

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        labels = batch["labels"]
        signals = batch.get("signals") or {}
        # the next-token loss over the scored positions only (the assistant's tokens): position t predicts t + 1
        scored = torch.zeros_like(labels, dtype=torch.bool)
        scored[:, :-1] = labels[:, 1:] != IGNORE
        out = self.run(batch, logits_at=scored)
        target = labels[:, 1:][scored[:, :-1]]
        lm = F.cross_entropy(out.logits.float(), target, reduction="sum") / max(1, target.numel())
        losses = {"lm": lm}
        total = lm
        for m, g in signals.items():
            has = g["has_target"]
            if not bool(has.any()):
                continue
            projector, scale = self.output_projectors[m], self.loss_scale[m]
            # a loss scaled to 0 is only watched (how far the states drift from the projector): no graph for it
            with torch.set_grad_enabled(torch.is_grad_enabled() and scale != 0):
                pred = projector(out.states[m][has].to(projector.fc.weight.dtype))
                # per-token Euclidean distance, averaged (official: ((u-v)²).sum(-1).sqrt().mean())
                l2 = torch.linalg.vector_norm(pred.float() - g["target"][has].float(), dim=-1).mean()
            losses[f"l2_{m}"] = l2
            if scale != 0:
                total = total + scale * l2
        losses["loss"] = total
        return losses


def count_parameters(modules: Sequence[nn.Module]) -> tuple[int, int]:
    """(trainable, total) over the modules, each shared parameter counted once."""
    seen: dict[int, nn.Parameter] = {}
    for mod in modules:
        for p in mod.parameters():
            seen.setdefault(id(p), p)
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, total


class Trainer:
    """Train a `NextGPT` in place.

    `init_adapter`: a peft adapter the model was started from (a previous stage-3 checkpoint):
    trained further when LoRA is trained, else merged for the forward pass and copied into every
    checkpoint so that nothing is lost. `full_embeddings`: the model was started from a checkpoint
    that replaced the WHOLE embedding / lm_head matrices (a converted official one, whose training
    moved every row): checkpoints then store the whole matrices (frozen rows + trained new rows),
    since the new rows alone would be applied to the pristine base matrices."""

    def __init__(self, model, cfg: TrainConfig, accelerator=None, *, init_adapter: str | os.PathLike | None = None,
                 full_embeddings: bool = False, meta: dict | None = None,
                 log: Callable[[str], None] | None = None):  # fmt: skip
        from accelerate.utils import set_seed

        self.model = model
        self.cfg = cfg
        self.accelerator = accelerator or make_accelerator(cfg.grad_accum)
        self.meta = dict(meta or {})
        self._log = log or print
        self.init_adapter = Path(init_adapter) if init_adapter else None
        self.full_embeddings = bool(full_embeddings)
        set_seed(cfg.seed)
        acc = self.accelerator
        groups = set(cfg.train)

        llm = model.llm
        for p in llm.parameters():
            p.requires_grad_(False)
        self.peft = None
        if "lora" in groups:
            from peft import LoraConfig, PeftModel, get_peft_model

            with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
                warnings.simplefilter("ignore", FutureWarning)
                if self.init_adapter is not None:
                    llm = PeftModel.from_pretrained(llm, str(self.init_adapter), is_trainable=True)
                    self._log(f"continuing LoRA adapter {self.init_adapter}")
                else:
                    llm = get_peft_model(llm, LoraConfig(
                        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM", bias="none",
                    ))  # fmt: skip
            self.peft = llm
        elif self.init_adapter is not None:
            from peft import PeftModel

            llm = PeftModel.from_pretrained(llm, str(self.init_adapter)).merge_and_unload()
            for p in llm.parameters():
                p.requires_grad_(False)
        model.llm = llm
        hf = llm.get_base_model() if self.peft is not None else llm
        self.hf = hf
        self.rows = NewRows(hf) if "new_rows" in groups else NewRows(hf, train_head=False) if "embed_rows" in groups else None
        if cfg.gradient_checkpointing:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        for name in ("input_proj", "output_projectors"):
            module = getattr(model, name)
            module.float()  # trainable weights in fp32 (fp16 masters break the grad scaler)
            module.requires_grad_(name in groups)
        self.module = TrainModule(llm, model.input_proj, model.output_projectors, cfg.loss_scale)
        self.module.train()
        # the encoder is frozen and not part of the module; it follows the accelerator's device
        enc = getattr(model, "encoder", None)
        if enc is not None and getattr(enc, "model", None) is not None and enc.device != acc.device:
            enc.model.to(acc.device)
            enc.device = acc.device

        modules = [self.module] + ([enc.model] if enc is not None and getattr(enc, "model", None) is not None else [])
        self.trainable, self.total = count_parameters(modules)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        if not self.params:
            raise TrainError("no trainable parameters")
        self._report_parameters()

    @property
    def _deepspeed(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.DEEPSPEED

    # ------------------------------------------------------------------ reporting
    def log(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            self._log(msg)

    def _report_parameters(self) -> None:
        parts = []
        if "lora" in self.cfg.train:
            parts.append(("LoRA", sum(p.numel() for n, p in self.module.llm.named_parameters() if "lora_" in n and p.requires_grad)))
        if "input_proj" in self.cfg.train:
            parts.append(("input_proj", sum(p.numel() for p in self.model.input_proj.parameters())))
        if "output_projectors" in self.cfg.train:
            parts.append(("output projectors", sum(p.numel() for p in self.model.output_projectors.parameters())))
        if self.rows is not None:
            parts.append((f"new token rows ({N_NEW}{' tied' if self.rows.tied else ' × 2' if self.rows.head is not None and self.rows.head.requires_grad else ', input side'})", sum(p.numel() for p in self.rows.parameters())))
        detail = ", ".join(f"{name} {n:,}" for name, n in parts)
        share = 100.0 * self.trainable / self.total
        self.log(f"trainable parameters: {self.trainable:,} of {self.total:,} ({share:.4f}%) [{detail}]")

    # ------------------------------------------------------------------ data
    def build_examples(self, dialogs: Sequence[Dialog]) -> list[Example]:
        m = self.model
        enc = DialogEncoder(m.tokenizer, m.template, m.system_prompt, self.cfg.max_length)
        examples = [e for e in (enc.encode(d) for d in dialogs) if e is not None]
        if enc.truncated:
            self.log(f"{enc.truncated} example(s) longer than max_length {self.cfg.max_length} were truncated"
                     + (f"; {enc.skipped} left with nothing to train were dropped" if enc.skipped else ""))  # fmt: skip
        if not examples:
            raise TrainError("no training examples (all empty after truncation?)")
        return examples

    # ------------------------------------------------------------------ checkpoints
    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors (`nextgpt.checkpoint` names); complete projection modules, as
        the format requires, plus the new token rows."""
        out = {}
        for k, v in self.model.input_proj.state_dict().items():
            out[f"input_proj.{k}"] = v
        for k, v in self.model.output_projectors.state_dict().items():
            out[f"output_projectors.{k}"] = v
        rows = dict(self.rows.state_dict()) if self.rows is not None else {}
        for side, module in (("embed_tokens", self.hf.get_input_embeddings()), ("lm_head", self.hf.get_output_embeddings())):
            if module is None:
                continue
            trained = rows.get(f"{side}.new_rows")
            if self.full_embeddings:
                full = module.weight.detach().to("cpu").clone()
                if trained is not None:
                    full[-N_NEW:] = trained.to(full.dtype)
                out[f"{side}.weight"] = full
            else:
                out[f"{side}.new_rows"] = trained if trained is not None else module.weight[-N_NEW:]
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}

    def _adapter_tensors(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.peft, save_embedding_layers=False)
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items() if ".lora_" in k}

    def write_checkpoint(self, dst: Path, step: int) -> None:
        """Write the nextgpt checkpoint files into `dst` (main process only)."""
        from safetensors.torch import save_file

        dst.mkdir(parents=True, exist_ok=True)
        (dst / META_FILE).unlink(missing_ok=True)  # meta.json last: its presence marks a complete checkpoint
        save_file(self.trainable_tensors(), str(dst / WEIGHTS_FILE), metadata={"format": "pt"})
        adapter = dst / ADAPTER_DIR
        if adapter.exists():
            shutil.rmtree(adapter)
        if self.peft is not None:
            adapter.mkdir()
            self.peft.peft_config["default"].save_pretrained(str(adapter))
            save_file(self._adapter_tensors(), str(adapter / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        elif self.init_adapter is not None:  # merged for training, kept for loading
            adapter.mkdir()
            for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                shutil.copy2(self.init_adapter / name, adapter / name)
        cfg = self.hf.config.get_text_config() if hasattr(self.hf.config, "get_text_config") else self.hf.config
        lora_cfg = self.peft.peft_config["default"] if self.peft is not None else None
        meta = {
            "format": FORMAT,
            "source": f"nextgpt-train stage {self.cfg.stage}",
            "stage": self.cfg.stage,
            "step": step,
            "trained": list(self.cfg.train),
            "llm_hidden": int(cfg.hidden_size),
            "vocab_size": int(self.hf.get_input_embeddings().weight.shape[0]),
            "num_layers": int(cfg.num_hidden_layers),
            "lora_rank": int(lora_cfg.r) if lora_cfg is not None else None,
            "lora_alpha": float(lora_cfg.lora_alpha) if lora_cfg is not None else None,
            "encoder_dim": int(self.model.input_proj.in_features),
            "new_rows": "whole matrices (embed_tokens.weight / lm_head.weight)" if self.full_embeddings
            else "embed_tokens.new_rows / lm_head.new_rows (the last 38 rows)",
            **self.meta,
        }
        state = {"stage": self.cfg.stage, "step": step, "planned_steps": getattr(self, "_max_steps", None),  # after a max_minutes cut
                 "num_processes": self.accelerator.num_processes, "config": _jsonable(asdict(self.cfg))}  # fmt: skip
        (dst / TRAINER_FILE).write_text(json.dumps(state, indent=2) + "\n")
        (dst / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    def load_trainable(self, src: Path) -> None:
        """Load the trainable tensors of a checkpoint directory written by `write_checkpoint`."""
        from safetensors.torch import load_file

        tensors = load_file(str(src / WEIGHTS_FILE))
        for side in ("embed_tokens", "lm_head"):
            if f"{side}.weight" in tensors:
                tensors[f"{side}.new_rows"] = tensors.pop(f"{side}.weight")[-N_NEW:]
        ip = {k[len("input_proj."):]: v for k, v in tensors.items() if k.startswith("input_proj.")}
        op = {k[len("output_projectors."):]: v for k, v in tensors.items() if k.startswith("output_projectors.")}
        self.model.input_proj.load_state_dict(ip, strict=True)
        self.model.output_projectors.load_state_dict(op, strict=True)
        if self.rows is not None:
            self.rows.load_state_dict(tensors)
        if self.peft is not None:
            from peft import set_peft_model_state_dict

            res = set_peft_model_state_dict(self.peft, load_file(str(src / ADAPTER_DIR / ADAPTER_WEIGHTS)))
            missing = [k for k in getattr(res, "missing_keys", []) if "lora_" in k]
            if missing:
                raise TrainError(f"{src}: adapter is missing {len(missing)} LoRA tensors (e.g. {missing[0]})")

    def _ckpt_dir(self, step: int) -> Path:
        return self.cfg.output_dir / CHECKPOINTS / f"step-{step:06d}"

    def find_resume(self) -> Path:
        r = self.cfg.resume
        if r in ("latest", True):
            root = self.cfg.output_dir / CHECKPOINTS
            done = sorted(d for d in root.glob("step-*") if (d / STATE_DIR / COMPLETE).is_file()) if root.is_dir() else []
            if not done:
                raise TrainError(f"nothing to resume: no complete checkpoint under {root}")
            return done[-1]
        path = Path(r).expanduser()
        if not (path / STATE_DIR / COMPLETE).is_file():
            raise TrainError(f"{path}: not a complete resumable checkpoint (no {STATE_DIR}/{COMPLETE})")
        return path

    def _prepare_output(self) -> None:
        out = self.cfg.output_dir
        ours = [META_FILE, WEIGHTS_FILE, ADAPTER_DIR, CHECKPOINTS, TRAINER_FILE, METRICS_FILE]
        present = [n for n in ours if (out / n).exists()]
        others = [p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith("rank-")] if out.is_dir() else []
        if self.cfg.resume is None and present and not self.cfg.overwrite:
            raise TrainError(f"{out} already holds a training run ({', '.join(present)}); pass --resume to continue it or --overwrite to start over")
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            if self.cfg.resume is None and self.cfg.overwrite:
                for n in present:
                    p = out / n
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            out.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        if others:
            self.log(f"note: {out} also holds {', '.join(sorted(others)[:5])}; they are left alone")

    # ------------------------------------------------------------------ sync check
    def check_in_sync(self) -> bool:
        """Every process holds the same trainable parameters (compares exact float64 checksums)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return True
        with torch.no_grad():
            s = torch.zeros(2, dtype=torch.float64, device=acc.device)
            for i, p in enumerate(self.params):
                d = p.detach().double()
                s[0] += d.sum() * (i + 1)
                s[1] += d.pow(2).sum()
            allv = acc.gather(s[None])
        same = bool((allv == allv[0]).all())
        if not same:
            raise TrainError(f"parameters differ across processes: checksums {allv.tolist()}")
        return same

    # ------------------------------------------------------------------ training
    def fit(
        self,
        dialogs: Sequence[Dialog],
        *,
        target_fn: Callable[[str, str], torch.Tensor] | None = None,
        media_fn: Callable | None = None,
    ) -> TrainResult:
        """Train on `dialogs` (see `training.trainer.data.load_stage_data`). `target_fn(modality,
        caption)` gives the decoder's text embedding (needed for outputs with a caption);
        `media_fn` encodes inputs (default: the model's frozen encoder, each file once)."""
        cfg, acc = self.cfg, self.accelerator
        self._prepare_output()
        examples = self.build_examples(dialogs)
        needs_targets = any(cap is not None for e in examples for _, _, cap in e.signals)
        if needs_targets and target_fn is None:
            raise TrainError("the data has outputs with captions but no target embeddings were given (target_fn)")
        if media_fn is None and any(e.media for e in examples):
            media_fn = MediaCache(self.model.encoder.encode)
        shapes = {m: (p.query_embs.shape[1], p.model.out_features) for m, p in self.model.output_projectors.items()}
        collator = Collator(self.model.tokenizer.pad_token_id or 0, self.model.input_proj.in_features, shapes, media_fn, target_fn)
        sampler = EpochSampler(len(examples), cfg.seed, [len(e.input_ids) for e in examples], cfg.batch_size, cfg.group_by_length)
        loader = torch.utils.data.DataLoader(examples, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collator)

        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
        )  # fmt: skip
        module, optimizer, loader = acc.prepare(self.module, optimizer, loader)
        batches_per_epoch = len(loader)
        steps_per_epoch = max(1, math.ceil(batches_per_epoch / cfg.grad_accum))
        self._max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))  # cut by max_minutes in _loop
        warmup = min(cfg.warmup_steps, self._max_steps)

        def schedule(step: int) -> float:  # linear warmup, then linear decay to 0 (WarmupDecayLR)
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (self._max_steps - step) / max(1, self._max_steps - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        progress = Progress()
        # not acc.register_for_checkpointing: accelerate reloads registered objects with
        # torch.load(weights_only=False), so a planted custom_checkpoint_*.pkl would run code
        self._scheduler, self._progress = scheduler, progress
        hooks = [
            acc.register_save_state_pre_hook(lambda models, weights, out: weights.clear()),
            acc.register_load_state_pre_hook(lambda models, inp: models.clear()),
        ]
        try:
            if cfg.resume is not None:
                src = self.find_resume()
                saved = json.loads((src / TRAINER_FILE).read_text())
                if saved.get("stage") != cfg.stage:
                    raise TrainError(f"{src} is a stage-{saved.get('stage')} checkpoint; this run is stage {cfg.stage}")
                was = {**saved.get("config", {}), "num_processes": saved.get("num_processes")}
                now = {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "seed": cfg.seed, "num_processes": acc.num_processes}
                changed = [f"{k} {was.get(k)} → {v}" for k, v in now.items() if was.get(k) is not None and was.get(k) != v]
                if changed:
                    self.log(f"warning: resuming with {', '.join(changed)}: the data order will not continue exactly")
                if cfg.max_minutes is not None and saved.get("planned_steps"):  # a run cut to its budget keeps that count
                    self._max_steps = min(self._max_steps, int(saved["planned_steps"]))
                self.load_trainable(src)
                # DeepSpeed restores the engine from its own files, which hold only the trainable tensors
                self.load_resumable(src / STATE_DIR, optimizer, scheduler, progress)
                self.log(f"resumed from {src} at step {progress.step}")
            return self._loop(module, optimizer, scheduler, loader, sampler, progress, steps_per_epoch, len(examples))
        finally:
            for h in hooks:
                h.remove()

    def _fit_to_budget(self, step: int, first_step: int, t_first: float, t_now: float, t_start: float) -> bool:
        """With `max_minutes`: once CALIBRATE_STEPS steps are timed (after the first, which pays for warm-up),
        cut the planned step count (`_max_steps`) to what the rest of the budget holds at that pace (never
        raise it). Whether it cut."""
        if self.cfg.max_minutes is None or step != first_step + CALIBRATE_STEPS:
            return False
        per_step = (t_now - t_first) / CALIBRATE_STEPS
        if self.accelerator.num_processes > 1:  # every process must stop at the same step: the slowest pace
            per_step = float(self.accelerator.reduce(torch.tensor([per_step], device=self.accelerator.device), reduction="max")[0])
        fits = step + int((60 * self.cfg.max_minutes - (t_now - t_start)) / per_step)
        if fits >= self._max_steps:
            return False
        self.log(f"time budget {self.cfg.max_minutes:g} min at {per_step:.3f} s a step: {self._max_steps} → {max(step, fits)} steps")
        self._max_steps = max(step, fits)
        return True

    def _loop(self, module, optimizer, scheduler, loader, sampler, progress, steps_per_epoch, n_examples) -> TrainResult:
        cfg, acc = self.cfg, self.accelerator
        self.log(
            f"stage {cfg.stage}: {n_examples} examples, {len(loader)} batches of {cfg.batch_size} per process × "
            f"{acc.num_processes} process(es), {steps_per_epoch} steps per epoch; training {self._max_steps} steps "
            f"(groups: {', '.join(cfg.train)})"
        )  # fmt: skip
        metrics_path = cfg.output_dir / METRICS_FILE
        bar = _ProgressBar(self._max_steps, progress.step, f"stage {cfg.stage}", bar=cfg.progress and acc.is_main_process,
                           main=acc.is_main_process)  # fmt: skip
        losses: list[float] = []
        history: list[dict] = []
        keys = ["loss", "lm"] + [f"l2_{m}" for m in MODALITIES]  # the same on every process (for reduce)
        sums = torch.zeros(2 * len(keys), dtype=torch.float64)
        t0 = time.perf_counter()
        first_step, t_first = progress.step + 1, None
        profiler = StepProfiler(cfg.profile_steps if acc.is_main_process else 0, cfg.output_dir / PROFILE_FILE, self.log)
        try:
            while progress.step < self._max_steps:
                sampler.use_epoch(progress.epoch)
                it = acc.skip_first_batches(loader, progress.batch_in_epoch) if progress.batch_in_epoch else loader
                for batch in it:
                    with acc.accumulate(module):
                        with record_function("forward"):
                            out = module(batch)
                        with record_function("backward"):
                            acc.backward(out["loss"])
                        with record_function("optimizer"):
                            if acc.sync_gradients and cfg.grad_clip:
                                acc.clip_grad_norm_(self.params, cfg.grad_clip)
                            optimizer.step()
                            optimizer.zero_grad(set_to_none=True)
                    for i, k in enumerate(keys):
                        if k in out:
                            sums[i] += float(out[k].detach())
                            sums[len(keys) + i] += 1
                    progress.batch_in_epoch += 1
                    if not acc.sync_gradients:
                        continue
                    progress.step += 1
                    t_now = time.perf_counter()
                    if progress.step == first_step:
                        t_first = t_now
                    elif t_first is not None and self._fit_to_budget(progress.step, first_step, t_first, t_now, t0):
                        bar.set_total(self._max_steps)  # (before the scheduler's step: the next LR follows the cut at once)
                    profiler.after_step(progress.step - first_step)
                    scheduler.step()
                    # the step's losses, averaged over micro-batches and processes
                    vec = acc.reduce(sums.to(acc.device), reduction="sum").cpu() if acc.num_processes > 1 else sums
                    vals = {k: float(vec[i] / vec[len(keys) + i]) for i, k in enumerate(keys) if vec[len(keys) + i] > 0}
                    row = {"step": progress.step, **vals, "lr": scheduler.get_last_lr()[0],
                           "time": round(time.perf_counter() - t0, 3)}  # fmt: skip
                    sums = torch.zeros_like(sums)
                    losses.append(row["loss"])
                    history.append(row)
                    if acc.is_main_process:
                        with metrics_path.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                    bar.update(progress.step, row["loss"])
                    if progress.step % cfg.log_every == 0 or progress.step == self._max_steps:
                        parts = " ".join(f"{k} {row[k]:.4f}" for k in keys if k in row)
                        bar.print(f"step {progress.step}/{self._max_steps} {parts} lr {row['lr']:.2e}")
                    if cfg.save_every and progress.step % cfg.save_every == 0 and progress.step < self._max_steps:
                        self.save(progress.step)
                    if progress.step >= self._max_steps:
                        break
                else:
                    progress.epoch += 1
                    progress.batch_in_epoch = 0
                    continue
                break
        finally:
            profiler.close()
            bar.close()
        self.save(progress.step, final=True)
        if cfg.dump_rank_state:
            from safetensors.torch import save_file

            t = self.trainable_tensors()
            if self.peft is not None:
                t.update({f"adapter.{k}": v for k, v in self._adapter_tensors().items()})
            save_file(t, str(cfg.output_dir / f"rank-{acc.process_index}.safetensors"))
        acc.wait_for_everyone()
        return TrainResult(progress.step, cfg.output_dir, losses, self.trainable, self.total, n_examples, history)

    def save(self, step: int, final: bool = False) -> Path:
        """Checkpoint `checkpoints/step-N/` (resumable); with `final`, also the output dir itself."""
        acc = self.accelerator
        self.check_in_sync()
        dst = self._ckpt_dir(step)
        acc.wait_for_everyone()
        if acc.is_main_process:
            if dst.exists():
                shutil.rmtree(dst)
            self.write_checkpoint(dst, step)
        acc.wait_for_everyone()
        acc.save_state(str(dst / STATE_DIR), **({"exclude_frozen_parameters": True} if self._deepspeed else {}))
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {"progress": self._progress.state_dict(), "scheduler": self._scheduler.state_dict()}
            (dst / STATE_DIR / PROGRESS_FILE).write_text(json.dumps(state, indent=1))
            (dst / STATE_DIR / COMPLETE).write_text(f"{step}\n")  # every process has written its part
        if final and acc.is_main_process:
            self.write_checkpoint(self.cfg.output_dir, step)
            self.log(f"saved checkpoint {self.cfg.output_dir} (step {step}; resumable state in {dst})")
        elif acc.is_main_process:
            self.log(f"saved {dst}")
        acc.wait_for_everyone()
        return dst

    def load_resumable(self, state_dir: Path, optimizer, scheduler, progress: Progress) -> None:
        """Restore optimizer, RNG, scheduler and step from `state_dir` without unpickling anything:
        tensors and plain containers through torch.load(weights_only=True) (a pickle that names any
        other object is refused, never run), the step and the scheduler from JSON. A checkpoint
        written before progress.json existed holds them in custom_checkpoint_{0,1}.pkl (plain
        dicts), read the same safe way."""
        import pickle
        import random

        import numpy as np
        from accelerate.utils import load as safe_load  # torch.load(weights_only=True) + numpy arrays

        acc = self.accelerator

        def read(path: Path, **kw):
            try:
                return safe_load(path, map_location="cpu", **kw)
            except pickle.UnpicklingError as e:
                raise TrainError(f"{path}: refusing to load (it holds more than tensors and plain data: {str(e).splitlines()[0]})") from None
            except FileNotFoundError:
                raise TrainError(f"{path}: missing; this checkpoint is incomplete") from None

        if self._deepspeed:  # the engine restores itself from its own files (optimizer shards)
            acc.load_state(str(state_dir), load_module_strict=False)
        else:
            optimizer.load_state_dict(read(state_dir / "optimizer.bin"))
            rng = read(state_dir / f"random_states_{acc.process_index}.pkl")
            random.setstate(rng["random_state"])
            np.random.set_state(rng["numpy_random_seed"])
            torch.set_rng_state(rng["torch_manual_seed"])
            if torch.cuda.is_available() and "torch_cuda_manual_seed" in rng:
                torch.cuda.set_rng_state_all(rng["torch_cuda_manual_seed"])
        if (state_dir / PROGRESS_FILE).is_file():
            try:
                saved = json.loads((state_dir / PROGRESS_FILE).read_text())
                progress.load_state_dict(saved["progress"])
                scheduler.load_state_dict(saved["scheduler"])
            except (ValueError, KeyError, TypeError) as e:
                raise TrainError(f"{state_dir / PROGRESS_FILE}: unreadable ({e})") from None
        else:  # written by an older version
            scheduler.load_state_dict(read(state_dir / "custom_checkpoint_0.pkl"))
            progress.load_state_dict(read(state_dir / "custom_checkpoint_1.pkl"))

    # ------------------------------------------------------------------ after training
    def finalize(self):
        """Merge the new rows and LoRA into the model and return it, ready for `generate`."""
        if self.rows is not None:
            self.rows.merge()
        if self.peft is not None:
            self.model.llm = self.peft.merge_and_unload()
            self.peft = None
        self.model.llm.eval()
        self.model.input_proj.eval()
        self.model.output_projectors.eval()
        for p in self.model.llm.parameters():
            p.requires_grad_(False)
        return self.model


class StepProfiler:
    """`profile_steps`: torch.profiler over that many optimizer steps after the first (which pays for
    warm-up): CPU time and, on a GPU, device time, of every op and of the loop's parts (`collate`:
    the batch from the data loader; `forward`, `backward`, `optimizer`); two tables go to OUT/profile.txt,
    the parts and ops by total time, then the ops by their own time."""

    def __init__(self, steps: int, path: Path, log: Callable[[str], None]):
        self.steps, self.path, self.log = int(steps), path, log
        self.prof, self.done, self.t0 = None, 0, 0.0

    def after_step(self, since_first: int) -> None:
        """Called after each optimizer step with the number of steps done since the first."""
        if not self.steps:
            return
        if self.prof is None and since_first == 0:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=activities)
            self.prof.start()
            self.t0 = time.perf_counter()
        elif self.prof is not None:
            self.done = since_first
            if self.done >= self.steps:
                self.close()

    def close(self) -> None:
        if self.prof is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        self.prof.stop()
        events, self.prof, self.steps = self.prof.key_averages(), None, 0
        own = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        total = "device_time_total" if torch.cuda.is_available() else "cpu_time_total"
        n = max(1, self.done)
        head = f"{self.done} step(s) profiled: {wall / n:.3f} s a step (wall clock, profiler overhead included)\n\n"
        self.path.write_text(head + "by total time (collate, forward, backward, optimizer: the loop's parts)\n"
                             + events.table(sort_by=total, row_limit=25) + "\nby own time\n" + events.table(sort_by=own, row_limit=25))  # fmt: skip
        self.log(f"profile of {self.done} step(s): {self.path}")


class _ProgressBar:
    """rich progress bar with the loss and the ETA (main process only)."""

    def __init__(self, total: int, start: int, title: str, bar: bool = True, main: bool = True):
        self.main = main
        self.progress = None
        if not bar:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        )  # fmt: skip
        self.task = self.progress.add_task(title, total=total, completed=start, loss="-")
        self.progress.start()

    def set_total(self, total: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, total=total)

    def update(self, step: int, loss: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, loss=f"{loss:.4f}")

    def print(self, msg: str) -> None:
        if self.progress is not None:
            self.progress.console.print(msg, highlight=False)
        elif self.main:
            print(msg, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x
