"""`mlx-llava train` and `mlx-llava fuse`."""

from typing import Annotated, Optional

import typer

from . import app

Opt = typer.Option


from mlx_llava.train.config import STAGES  # noqa: E402  (light: the stage table, for the help)

STAGE_HELP = "; ".join(f"{n}: {s.name}, trains {s.trains}" for n, s in STAGES.items())


@app.command()
def train(
    ctx: typer.Context,
    stage: Annotated[Optional[int], Opt("--stage", help=STAGE_HELP)] = None,
    data: Annotated[Optional[str], Opt("--data", help="LLaVA JSON or JSONL records.")] = None,
    image_folder: Annotated[Optional[str], Opt("--image-folder", help="Image paths in the data are relative to this.")] = None,
    output: Annotated[Optional[str], Opt("--output", "-o", help="Output folder.")] = None,
    model: Annotated[Optional[str], Opt("--model", help="An existing LLaVA model directory to train.")] = None,
    language_model: Annotated[Optional[str], Opt("--language-model", help="mlx-lm language model directory (new LLaVA from parts).")] = None,
    vision_tower: Annotated[Optional[str], Opt("--vision-tower", help="CLIP directory (new LLaVA from parts).")] = None,
    projector_type: Annotated[Optional[str], Opt("--projector-type", help="linear or mlp2x_gelu (new LLaVA).")] = None,
    conv_mode: Annotated[Optional[str], Opt("--conv-mode", help="Stage-2 template (default: the model's).")] = None,
    lora: Annotated[bool, Opt("--lora", help="Stage 2: LoRA adapters (default).")] = False,
    qlora: Annotated[bool, Opt("--qlora", help="Stage 2: LoRA on a 4-bit base.")] = False,
    full: Annotated[bool, Opt("--full", help="Stage 2: the whole language model learns.")] = False,
    lora_rank: Annotated[Optional[int], Opt("--lora-rank")] = None,
    lora_alpha: Annotated[Optional[float], Opt("--lora-alpha")] = None,
    lora_dropout: Annotated[Optional[float], Opt("--lora-dropout")] = None,
    lora_layers: Annotated[Optional[int], Opt("--lora-layers", help="The last N blocks get adapters (-1: all).")] = None,
    learning_rate: Annotated[Optional[float], Opt("--learning-rate", "--lr")] = None,
    projector_lr: Annotated[Optional[float], Opt("--projector-lr")] = None,
    vision_tower_lr: Annotated[Optional[float], Opt("--vision-tower-lr", help="Stage 2: the vision tower learns too, at this rate (LLaVA-1.6: 2e-6).")] = None,
    batch_size: Annotated[Optional[int], Opt("--batch-size", help="Global batch: samples per step, over all processes.")] = None,
    grad_accum: Annotated[Optional[int], Opt("--grad-accum", help="Micro-batches per step on each process.")] = None,
    epochs: Annotated[Optional[float], Opt("--epochs")] = None,
    iters: Annotated[Optional[int], Opt("--iters", help="Optimizer steps (overrides --epochs).")] = None,
    optimizer: Annotated[Optional[str], Opt("--optimizer", help="adamw (LLaVA's), or muon: Muon for the weight matrices, AdamW for the rest.")] = None,
    muon_lr: Annotated[Optional[float], Opt("--muon-lr", help="Muon's learning rate (with --optimizer muon).")] = None,
    warmup_ratio: Annotated[Optional[float], Opt("--warmup-ratio")] = None,
    max_length: Annotated[Optional[int], Opt("--max-length")] = None,
    grad_checkpoint: Annotated[Optional[bool], Opt("--grad-checkpoint/--no-grad-checkpoint")] = None,
    compile: Annotated[Optional[bool], Opt("--compile/--no-compile", help="Compile the training step (mx.compile; on by default).")] = None,
    group_by_length: Annotated[Optional[bool], Opt("--group-by-length/--no-group-by-length", help="Batch samples of like length together (LLaVA-1.5's --group_by_modality_length).")] = None,
    cache_features: Annotated[Optional[str], Opt("--cache-features", help="Folder for cached vision features.")] = None,
    save_every: Annotated[Optional[int], Opt("--save-every")] = None,
    keep: Annotated[Optional[int], Opt("--keep", help="Checkpoints to keep.")] = None,
    eval_every: Annotated[Optional[int], Opt("--eval-every")] = None,
    val_data: Annotated[Optional[str], Opt("--val-data")] = None,
    resume: Annotated[Optional[bool], Opt("--resume/--no-resume", help="Continue from the newest checkpoint.")] = None,
    seed: Annotated[Optional[int], Opt("--seed")] = None,
    config: Annotated[Optional[str], Opt("--config", help="YAML file with the same keys as these flags.")] = None,
):
    """Train LLaVA: stage 1 (projector) or stage 2 (LoRA, QLoRA or full)."""
    flags = {k: v for k, v in ctx.params.items() if v is not None and k not in ("config", "lora", "qlora", "full")}
    from mlx_llava.errors import LlavaError
    from mlx_llava.train.config import TrainConfig, read_file

    if lora + qlora + full > 1:
        raise LlavaError("choose one of --lora, --qlora, --full")
    method = "lora" if lora else "qlora" if qlora else "full" if full else None
    if method:
        flags["method"] = method
    values = {**(read_file(config) if config else {}), **flags}
    missing = [f"--{k}" for k in ("stage", "data", "output") if k not in values]
    if missing:
        raise LlavaError(f"missing {', '.join(missing)} (or give them in --config)")
    cfg = TrainConfig(**values)  # every option checked before the slow imports
    from mlx_llava.train import train as run

    run(cfg)


@app.command()
def fuse(
    model: Annotated[str, Opt("--model", help="The base LLaVA model directory.")],
    adapters: Annotated[str, Opt("--adapters", help="A stage-2 LoRA output folder.")],
    output: Annotated[str, Opt("--output", "-o", help="Where to write the fused model.")],
    quantize: Annotated[bool, Opt("-q", "--quantize", help="Quantize the fused model.")] = False,
    q_bits: Annotated[Optional[int], Opt("--q-bits", help="With -q: 4 or 8 (default 4). Refused without -q.")] = None,
    q_group_size: Annotated[Optional[int], Opt("--q-group-size", help="With -q: 32, 64 or 128 (default 64). Refused without -q.")] = None,
):
    """Merge LoRA adapters (and the trained projector) into a model directory."""
    from mlx_llava.errors import LlavaError, check_output, check_quantization

    if not quantize and (q_bits is not None or q_group_size is not None):
        raise LlavaError("--q-bits and --q-group-size need -q (--quantize)")
    bits = (4 if q_bits is None else q_bits) if quantize else None
    group_size = 64 if q_group_size is None else q_group_size
    if quantize:
        check_quantization(bits, group_size)
    check_output(output, [model, adapters])  # before the slow imports
    from mlx_llava.adapters import fuse as run

    path = run(model, adapters, output, bits=bits, group_size=group_size)
    print(f"wrote {path}")
