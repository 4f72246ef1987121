"""Training knobs, with the LLaVA-1.5 recipes as defaults.

`STAGES` is the one statement of what differs between the paper's two
stages; the trainer, the CLI's help and the README's table read it. Both
stages: 1 epoch, cosine with warmup ratio 0.03, max length 2048, AdamW
without weight decay, gradients clipped at 1.0; LoRA rank 128, alpha 256,
dropout 0.05 (LLaVA-1.5's LoRA recipe).
"""

import os
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

from ..errors import LlavaError, check_output, is_int, is_number, need

METHODS = ("lora", "qlora", "full")
OPTIMIZERS = ("adamw", "muon")
QLORA_BITS = (2, 3, 4, 5, 6, 8)
# The smallest value each numeric option takes ("above": strictly more).
AT_LEAST = dict(batch_size=1, grad_accum=1, iters=1, save_every=1, keep=1, eval_every=1, lora_rank=1,
                max_length=1, seed=0, projector_lr=0, vision_tower_lr=0,
               weight_decay=0, max_grad_norm=0, warmup_ratio=0,
                lora_dropout=0)
ABOVE = dict(learning_rate=0, muon_lr=0, epochs=0, lora_alpha=0)
BELOW = dict(warmup_ratio=1, lora_dropout=1, seed=2**32)  # strictly less


@dataclass(frozen=True)
class Stage:
    """One of LLaVA's two training stages, with LLaVA-1.5's defaults."""

    name: str
    template: Optional[str]  # the template its targets are made with; None: the model's own
    trains: str
    methods: tuple  # what may learn: "projector", or the language model's methods (the first: default)
    learning_rate: dict  # by method
    projector_lr: dict  # by method; None: the same as learning_rate
    batch_size: int
    writes: str

    @property
    def template_text(self) -> str:
        return f"`{self.template}` (image, then caption)" if self.template else \
            "the model's (`vicuna_v1` for LLaVA-1.5)"

    @property
    def rates_text(self) -> str:
        groups = {}
        for method, lr in self.learning_rate.items():
            projector = self.projector_lr[method]
            text = _e(lr) + (f" (projector {_e(projector)})" if projector else "")
            groups.setdefault(text, []).append(NAMES.get(method, method))
        return ", ".join(f"{'/'.join(m)} {t}" if len(self.learning_rate) > 1 else t for t, m in groups.items())


NAMES = {"lora": "LoRA", "qlora": "QLoRA", "full": "full"}


def _e(x: float) -> str:
    return f"{x:.0e}".replace("e-0", "e-")


STAGES = {
    1: Stage(
        name="feature alignment", template="plain", trains="the projector",
        methods=("projector",), learning_rate={"projector": 1e-3}, projector_lr={"projector": None},
        batch_size=256, writes="`projector.safetensors`, `model/`"),
    2: Stage(
        name="visual instruction tuning", template=None,
        trains="projector + language model: LoRA (default), QLoRA or full",
        methods=("lora", "qlora", "full"), learning_rate={"lora": 2e-4, "qlora": 2e-4, "full": 2e-5},
        projector_lr={"lora": 2e-5, "qlora": 2e-5, "full": None}, batch_size=128,
        writes="`adapters.safetensors`, `adapter_config.json`, `projector.safetensors`; full: `model/`"),
}


def stage_table() -> str:
    """STAGES as the README's Markdown table."""
    rows = ["| stage | template | what trains | learning rate | batch | writes |", "|---|---|---|---|---|---|"]
    for number, s in STAGES.items():
        rows.append(f"| {number}: {s.name} | {s.template_text} | {s.trains} | {s.rates_text} | {s.batch_size} "
                    f"| {s.writes} |")
    return "\n".join(rows)


@dataclass
class TrainConfig:
    stage: int
    data: str
    output: str
    image_folder: Optional[str] = None
    # the model: an existing LLaVA directory, or one assembled from parts
    model: Optional[str] = None
    language_model: Optional[str] = None
    vision_tower: Optional[str] = None
    projector_type: str = "mlp2x_gelu"
    conv_mode: Optional[str] = None  # stage 2: the model's template; stage 1 always "plain"
    # what learns (stage 2)
    method: Optional[str] = None  # lora | qlora | full; stage 2 default: lora
    lora_rank: int = 128
    lora_alpha: float = 256.0
    lora_dropout: float = 0.05
    lora_layers: int = -1  # the last N blocks of the language model; -1: all
    qlora_bits: int = 4
    # optimisation
    learning_rate: Optional[float] = None
    projector_lr: Optional[float] = None
    vision_tower_lr: Optional[float] = None  # stage 2: the vision tower learns too, at this rate (LLaVA-1.6: 2e-6)
    batch_size: Optional[int] = None  # the global batch: samples per optimizer step, over all processes
    grad_accum: Optional[int] = None  # micro-batches per step on each process (default: micro-batches of <= 8)
    epochs: float = 1.0
    iters: Optional[int] = None  # overrides epochs
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | muon: Muon for the weight matrices, AdamW for the rest
    muon_lr: float = 0.02  # Muon's learning rate (its updates are orthogonalized, so its scale is its own)
    max_grad_norm: float = 1.0
    max_length: int = 2048
    group_by_length: bool = False  # LLaVA-1.5's --group_by_modality_length: batches of like length
    grad_checkpoint: bool = False
    compile: bool = True  # compile each micro-batch's forward and backward pass (mx.compile)
    cache_features: Optional[str] = None
    # bookkeeping
    save_every: int = 500
    keep: int = 2
    eval_every: Optional[int] = None
    val_data: Optional[str] = None
    resume: bool = False
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        self.check_types()
        if self.stage not in (1, 2):
            raise LlavaError(f"--stage must be 1 or 2, not {self.stage}")
        if (self.model is None) == (self.language_model is None):
            raise LlavaError("give either --model, or --language-model with --vision-tower")
        if self.language_model is not None and self.vision_tower is None:
            raise LlavaError("--language-model needs --vision-tower (a CLIP directory)")
        stage = STAGES[self.stage]
        if self.stage == 1 and self.method not in (None, "projector"):
            raise LlavaError(f"stage 1 trains the projector alone: --{self.method} is for stage 2")
        self.method = self.method or stage.methods[0]
        if self.method not in stage.methods:
            raise LlavaError(f"unknown training method {self.method!r}; expected one of {stage.methods}")
        if self.optimizer not in OPTIMIZERS:
            raise LlavaError(f"unknown optimizer {self.optimizer!r}; expected one of {OPTIMIZERS}")
        if self.learning_rate is None:
            self.learning_rate = stage.learning_rate[self.method]
        if self.projector_lr is None:
            self.projector_lr = stage.projector_lr[self.method] or self.learning_rate
        if self.batch_size is None:
            self.batch_size = stage.batch_size
        if self.eval_every and not self.val_data:
            raise LlavaError("--eval-every needs --val-data")
        if self.vision_tower_lr is not None and self.stage != 2:
            raise LlavaError("--vision-tower-lr is for stage 2 (stage 1 trains the projector only)")
        if self.vision_tower_lr is not None and self.cache_features:
            raise LlavaError("--cache-features needs a frozen vision tower: its features change as it trains "
                             "with --vision-tower-lr")
        self.check_values()

    def check_types(self):
        """Each option of its field's type (a YAML file can hold anything);
        a number written as a string ("1e-3", which YAML reads as one) is
        read, and a path may be a Path."""
        for f in fields(self):
            value, kind = getattr(self, f.name), f.type
            optional = type(None) in typing.get_args(kind)
            kind = next((k for k in typing.get_args(kind) if k is not type(None)), kind)
            if value is None:
                need(optional, f"--{flag(f.name)} is required")
                continue
            if kind is float and isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    pass
            if kind is str and isinstance(value, os.PathLike):
                value = os.fspath(value)
            setattr(self, f.name, value)
            ok = {int: is_int, float: is_number, bool: lambda v: isinstance(v, bool),
                  str: lambda v: isinstance(v, str)}[kind](value)
            need(ok, f"--{flag(f.name)} must be {'an' if kind is int else 'a'} "
                     f"{dict(int='integer', float='number', bool='true or false', str='string')[kind.__name__]}, "
                     f"not {value!r}")

    def check_values(self):
        """Numbers in range, and settings that only make sense together."""
        for name, low in AT_LEAST.items():
            value = getattr(self, name)
            need(value is None or value >= low, f"--{flag(name)} must be at least {low}, not {value}")
        for name, low in ABOVE.items():
            value = getattr(self, name)
            need(value is None or value > low, f"--{flag(name)} must be more than {low}, not {value}")
        for name, high in BELOW.items():
            value = getattr(self, name)
            need(value < high, f"--{flag(name)} must be less than {high}, not {value}")
        need(self.lora_layers == -1 or self.lora_layers >= 1,
             f"--lora-layers must be -1 (all blocks) or at least 1, not {self.lora_layers}")
        need(self.qlora_bits in QLORA_BITS,
             f"qlora_bits must be one of {', '.join(map(str, QLORA_BITS))}, not {self.qlora_bits}")
        if self.conv_mode is not None:
            from ..conversation import CHAT_TEMPLATE, get_template

            if self.conv_mode != CHAT_TEMPLATE:
                get_template(self.conv_mode)
        if self.image_folder is not None:
            need(Path(self.image_folder).is_dir(), f"--image-folder {self.image_folder} is not a folder")
        check_output(self.output, [self.model, self.language_model, self.vision_tower])

    @classmethod
    def from_file(cls, path, **overrides) -> "TrainConfig":
        """A YAML (or JSON) file with the same keys as the flags; `overrides` win."""
        return cls(**{**read_file(path), **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


def flag(name: str) -> str:
    return name.replace("_", "-")


def read_file(path) -> dict:
    """A YAML (or JSON) file of training options, checked against the known keys."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise LlavaError(f"config file not found: {path}") from None
    except (IsADirectoryError, UnicodeDecodeError):
        raise LlavaError(f"{path} is not a YAML file") from None
    except yaml.YAMLError as e:
        raise LlavaError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise LlavaError(f"{path}: expected a mapping of option: value")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise LlavaError(f"{path}: unknown training option(s): {', '.join(unknown)}")
    return values
