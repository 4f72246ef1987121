"""`mlx-llava convert`: a LLaVA checkpoint (hub or folder) -> an MLX model directory."""

from typing import Annotated, Optional

import typer

from . import app, options

Opt = typer.Option


@app.command()
def convert(
    hf: Annotated[str, Opt("--hf", "--hf-path", help="Source: hub repo id or folder (original LLaVA, stage-1, LoRA, llava-hf, mlx-vlm).")],
    mlx_path: Annotated[str, Opt("--mlx-path", help="Output folder.")] = "mlx_model",
    dtype: Annotated[Optional[str], Opt("--dtype", help="float16, bfloat16 or float32: the unquantized weights and, with -q, the scales and biases. Default: float16 (an MLX source keeps its own); on a CPU (Linux) use float32: float16 scales run about 35x slower there.")] = None,
    quantize: Annotated[bool, Opt("-q", "--quantize", help="Quantize, as mlx-lm does (embeddings and lm_head too).")] = False,
    q_bits: Annotated[Optional[int], Opt("--q-bits", help="With -q: 4 or 8 (default 4). Refused without -q.")] = None,
    q_group_size: Annotated[Optional[int], Opt("--q-group-size", help="With -q: 32, 64 or 128 (default 64). Refused without -q.")] = None,
    quantize_vision: Annotated[bool, Opt("--quantize-vision", help="With -q: quantize the vision tower as well.")] = False,
    vision_tower: Annotated[Optional[str], Opt("--vision-tower", help="CLIP repo or folder, instead of the config's mm_vision_tower.")] = None,
    model_base: Annotated[Optional[str], Opt("--model-base", help="The language model a stage-1 or LoRA output was trained on.")] = None,
    conv_mode: Annotated[Optional[str], Opt("--conv-mode", help="Chat template to record (default: the original's rule from the model name).")] = None,
    upload_repo: Annotated[Optional[str], Opt("--upload-repo", help="Upload the result to this hub repository.")] = None,
    force: Annotated[bool, Opt("--force", help="Replace an existing output folder.")] = False,
):
    """Convert a LLaVA checkpoint into an MLX model directory."""
    from mlx_llava.convert import convert as run

    with options.conversion_progress() as on_tensor:
        summary = run(
            hf, mlx_path, dtype=dtype, quantize=quantize, q_bits=q_bits, q_group_size=q_group_size,
            quantize_vision=quantize_vision, vision_tower=vision_tower, model_base=model_base,
            conv_mode=conv_mode, upload_repo=upload_repo, force=force, on_tensor=on_tensor,
        )
    print(summary)
