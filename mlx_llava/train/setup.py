"""Everything a training run needs before its first step.

Load the model (an existing LLaVA, or one assembled from a language model
and a CLIP), freeze what the stage keeps fixed, make the data, fill the
feature cache, build the optimizer and its schedule, and restore a
checkpoint when resuming. The loop itself is in `trainer.py`.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from ..errors import LlavaError
from . import checkpoint
from .config import STAGES, TrainConfig, flag
from .data import Dataset, prepare, skip_summary
from .features import FeatureCache, fill_cache


@dataclass
class Run:
    """A run ready to train: model, data, optimizer and where it starts."""

    cfg: TrainConfig
    model: nn.Module
    model_config: dict
    processor: object
    lora: Optional[dict]  # LoRA settings written beside the adapters
    conv_mode: str
    data: Dataset
    val: Optional[Dataset]
    features: Optional[FeatureCache]
    micro: int  # samples per micro-batch
    accum: int  # micro-batches per step on each process
    per_epoch: int  # optimizer steps per epoch
    total: int  # optimizer steps in all
    optimizer: optim.Optimizer
    start: int  # the step a resumed run continues from
    group: object  # mx.distributed group

    @property
    def lengths(self) -> list:
        return [len(e.input_ids) for e in self.data.examples]


def setup(cfg: TrainConfig, say=print) -> Run:
    group = mx.distributed.init()
    world = group.size()
    mx.random.seed(cfg.seed)  # new layers (projector, LoRA) start the same on every rank and run
    model, model_config, processor = load_base(cfg)
    lora = setup_trainable(model, cfg)
    conv_mode = STAGES[cfg.stage].template or cfg.conv_mode or processor.train_conv_mode

    # AnyRes: each image's visual tokens depend on its size, read from its header
    count = processor.visual_tokens if processor.anyres is not None else processor.num_visual_tokens

    def load_data(path):
        return prepare(path, processor.encoder, conv_mode, processor.image_token_index,
                       count, cfg.image_folder, cfg.max_length, processor.image_wrap)

    data = load_data(cfg.data)
    val = load_data(cfg.val_data) if cfg.val_data else None
    features = FeatureCache(cfg.cache_features, model, processor.image_config) if cfg.cache_features else None
    if features is not None:
        fill_cache(features, model, processor, [data] + ([val] if val else []),
                   group.rank() == 0 and cfg.progress)
    micro, accum = split_batch(cfg.batch_size, world, cfg.grad_accum)
    per_epoch = len(data.examples) // cfg.batch_size
    if per_epoch == 0:
        why = f"; skipped {len(data.skipped)}: {skip_summary(data.skipped)}" if data.skipped else ""
        raise LlavaError(
            f"{cfg.data} has {len(data.examples)} usable examples, fewer than one global batch "
            f"(--batch-size {cfg.batch_size}){why}"
        )
    total = cfg.iters or max(1, math.ceil(cfg.epochs * per_epoch))

    optimizer = make_optimizer(cfg, total)
    optimizer.init(model.trainable_parameters())
    start = 0
    out = Path(cfg.output)
    if cfg.resume:
        found = checkpoint.checkpoints(out / "checkpoints")
        if found:
            check_resume(found[-1], cfg, lora)
            start = checkpoint.load(found[-1], model, optimizer)["step"]
            say(f"resuming from {found[-1]} (step {start})")
        else:
            say(f"--resume: no checkpoint in {out / 'checkpoints'}, starting from scratch")
    if group.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    return Run(cfg, model, model_config, processor, lora, conv_mode, data, val, features,
               micro, accum, per_epoch, total, optimizer, start, group)


# ---------------------------------------------------------------- resuming

# The settings a checkpoint's tensors depend on: resuming with others would
# load weights of other shapes, or of another model, and end in adapters
# that cannot be used.
RESUME_SETTINGS = ("stage", "method", "lora_rank", "lora_layers", "qlora_bits", "projector_type",
                   "model", "language_model", "vision_tower")
PATHS = ("model", "language_model", "vision_tower")


def resume_settings(cfg: dict, lora=None) -> dict:
    """`lora`: setup_trainable's answer, whose num_layers is the blocks
    adapted, so that --lora-layers -1 and its number agree."""
    settings = {k: cfg.get(k) for k in RESUME_SETTINGS}
    if lora is not None:
        settings["lora_layers"] = lora["num_layers"]
    if settings["method"] not in ("lora", "qlora"):
        del settings["lora_rank"], settings["lora_layers"]
    if settings["method"] != "qlora":
        del settings["qlora_bits"]
    if settings["model"]:
        del settings["projector_type"]  # the model's own
    for k in PATHS:
        if settings.get(k) and Path(settings[k]).expanduser().exists():
            settings[k] = str(Path(settings[k]).expanduser().resolve())
    return settings


def check_resume(path: Path, cfg: TrainConfig, lora=None):
    """Refuse to resume from a checkpoint made with other settings, naming the
    first that differs. An older checkpoint without its settings is compared
    with the run folder's train_config.json (paths aside: they were relative
    to another working directory, perhaps)."""
    old = checkpoint.state(path).get("settings")
    compare_paths = old is not None
    if old is None:
        saved = path.parent.parent / "train_config.json"
        if not saved.exists():
            return
        try:
            old = resume_settings(json.loads(saved.read_text()))
        except ValueError:
            return
    new = resume_settings(cfg.to_dict(), lora)
    for key in RESUME_SETTINGS:
        if key in PATHS and not compare_paths or key == "lora_layers" and -1 in (old.get(key), new.get(key)):
            continue
        if key in old or key in new:
            if old.get(key) != new.get(key):
                def show(value):
                    return f"--{value}" if key == "method" else f"--{flag(key)} {value}"

                raise LlavaError(
                    f"cannot resume from {path}: it was made with {show(old.get(key))}, this run with "
                    f"{show(new.get(key))} (resume with the same settings, or train into a new --output)"
                )


# ---------------------------------------------------------------- the model


def load_base(cfg: TrainConfig):
    """The model to train: an existing LLaVA directory, or one assembled from parts."""
    from ..processor import Processor
    from ..weights import assemble, load_model, resolve

    if cfg.model:
        path = resolve(cfg.model)
        model, config = load_model(path)
        return model, config, Processor.from_dir(path, config)
    return assemble(cfg.language_model, cfg.vision_tower, cfg.projector_type, cfg.conv_mode)


def setup_trainable(model, cfg: TrainConfig):
    """Freeze what the stage keeps fixed. Returns the LoRA settings, if any."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    lora = None
    if cfg.method in ("lora", "qlora"):
        lm = model.language_model
        if cfg.method == "qlora":
            # QLoRA: the frozen base in low precision, the adapters in full.
            nn.quantize(lm, group_size=64, bits=cfg.qlora_bits,
                        class_predicate=lambda p, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % 64 == 0)
        layers = len(lm.layers) if cfg.lora_layers < 0 else cfg.lora_layers
        if layers > len(lm.layers):
            raise LlavaError(f"--lora-layers {layers}: the language model has {len(lm.layers)} blocks")
        lora = {"rank": cfg.lora_rank, "scale": cfg.lora_alpha / cfg.lora_rank, "dropout": cfg.lora_dropout}
        linear_to_lora_layers(lm, layers, lora)
        lora = {"num_layers": layers, "lora_parameters": lora}
        if cfg.method == "qlora":
            lora["quantized_base"] = {"group_size": 64, "bits": cfg.qlora_bits}
    elif cfg.method == "full":
        model.language_model.unfreeze()
    model.multi_modal_projector.unfreeze()
    if "image_newline" in model:  # LLaVA-1.6's learned row end learns with the projector
        model.unfreeze(keys=["image_newline"], recurse=False)
    if cfg.vision_tower_lr is not None:
        model.vision_tower.unfreeze()
    if cfg.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.language_model.layers[0])
    return lora


def trainable_count(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


# ---------------------------------------------------------------- optimizer


def make_optimizer(cfg: TrainConfig, total: int):
    """AdamW, cosine with linear warmup (as transformers' Trainer schedules it);
    the projector (with LLaVA-1.6's image_newline) in a group of its own when
    its learning rate differs, the vision tower in its own when it trains. With
    `optimizer="muon"`, Muon updates the weight matrices (every 2-D weight but
    the embeddings and the head, as its authors advise; the projector's too,
    so `projector_lr` then sets only its biases) at `muon_lr`."""
    warmup = math.ceil(cfg.warmup_ratio * total)

    def schedule(lr):
        cosine = optim.cosine_decay(lr, max(total - warmup, 1))
        if warmup == 0:
            return cosine
        return optim.join_schedules([optim.linear_schedule(0.0, lr, warmup), cosine], [warmup])

    def adamw(lr):
        return optim.AdamW(learning_rate=schedule(lr), weight_decay=cfg.weight_decay)

    groups, filters = [], []
    if cfg.optimizer == "muon":
        groups.append(optim.Muon(learning_rate=schedule(cfg.muon_lr), weight_decay=cfg.weight_decay))
        filters.append(is_matrix)
    if cfg.vision_tower_lr is not None:
        groups.append(adamw(cfg.vision_tower_lr))
        filters.append(lambda path, _: path.startswith("vision_tower."))
    if cfg.projector_lr != cfg.learning_rate:
        groups.append(adamw(cfg.projector_lr))
        filters.append(lambda path, _: path.startswith("multi_modal_projector") or path == "image_newline")
    if not groups:
        return adamw(cfg.learning_rate)
    return optim.MultiOptimizer(groups + [adamw(cfg.learning_rate)], filters)


def is_matrix(path: str, weight) -> bool:
    """A weight Muon should update: 2-D, and neither an embedding nor the head."""
    return weight.ndim == 2 and "embed" not in path and "lm_head" not in path


def current_lr(optimizer) -> float:
    inner = optimizer.optimizers[-1] if isinstance(optimizer, optim.MultiOptimizer) else optimizer
    return float(inner.learning_rate.item())


def split_batch(batch_size: int, world: int, grad_accum=None):
    """-> (micro-batch size, micro-batches per process) for a global batch."""
    if batch_size % world:
        raise LlavaError(f"--batch-size {batch_size} does not split over {world} processes")
    per_rank = batch_size // world
    if grad_accum is None:
        grad_accum = next(d for d in range(1, per_rank + 1) if per_rank % d == 0 and per_rank // d <= 8)
    if grad_accum < 1 or per_rank % grad_accum:
        raise LlavaError(
            f"--grad-accum {grad_accum} does not divide the {per_rank} samples each process takes per step"
        )
    return per_rank // grad_accum, grad_accum
