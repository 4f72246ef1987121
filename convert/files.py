"""The small files of an output directory: tokenizer, preprocessor, config, model card.

The tokenizer is the source's, read and re-saved with transformers (no
torch) after registering `<image>` (and, for LLaVA v1 models, the original's
`<im_patch>`/`<im_start>`/`<im_end>` in its order), so that llava-hf tools
and ours find the same ids. The embedding table is not resized: our model
looks up no row for the image token.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlx_llava.conversation import IMAGE_PLACEHOLDER
from mlx_llava.errors import LlavaError
from mlx_llava.image import ImageConfig


def load_tokenizer(folder: Path, extra_tokens: list):
    """The source tokenizer with `extra_tokens` then `<image>` registered.

    Read with the `legacy` the original's slow tokenizer had (transformers 5
    assumes False where a config leaves it out; transformers 4, True)."""
    from transformers import AutoTokenizer

    from mlx_llava.processor import attach_chat_template, tokenizer_legacy

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), legacy=tokenizer_legacy(folder))
    except Exception as e:  # transformers raises many kinds for a missing or bad tokenizer
        raise LlavaError(f"cannot read the tokenizer in {folder} ({type(e).__name__}: {e})".splitlines()[0]) from None
    tokenizer.add_tokens(list(extra_tokens) + [IMAGE_PLACEHOLDER], special_tokens=True)
    attach_chat_template(tokenizer, folder)
    return tokenizer


def save_tokenizer(tokenizer, out: Path, source: Path):
    """Tokenizer files, with the source's `legacy` recorded for LLaMA-style ones."""
    from mlx_llava.processor import tokenizer_legacy, write_legacy

    tokenizer.save_pretrained(str(out))
    if getattr(tokenizer, "legacy", None) is not None:
        write_legacy(out, tokenizer_legacy(source))


def token_id(tokenizer, token: str) -> int:
    return tokenizer.convert_tokens_to_ids(token)


def preprocessor_config(source_config: dict, image_aspect_ratio: str, grid_pinpoints=None) -> dict:
    """A preprocessor_config.json that our Processor and transformers read alike
    (AnyRes: with the model's pinpoints, (height, width))."""
    config = ImageConfig.from_preprocessor_config(source_config or {}, image_aspect_ratio, grid_pinpoints)
    return config.to_preprocessor_config()


def write_json(path: Path, data: dict):
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def model_card(source: str, kind: str, command: str, config: dict, summary_lines: list) -> str:
    """README.md: where the model came from and how it was made."""
    q = config.get("quantization")
    quant = f"{q['bits']}-bit, group size {q['group_size']}" if q else "none"
    link = f"[`{source}`](https://huggingface.co/{source})" if _looks_like_repo(source) else f"`{source}`"
    lines = [
        "---",
        "library_name: mlx",
        "tags: [mlx, llava, vision-language-model]",
        *([f"base_model: {source}"] if _looks_like_repo(source) else []),
        "---",
        "",
        f"# {Path(source).name} for MLX",
        "",
        f"Converted with mlx-llava from {link} ({kind} layout):",
        "",
        f"    {command}",
        "",
        f"- quantization: {quant}",
        f"- conversation template: `{config.get('conv_mode')}`",
        f"- image preprocessing: `{config.get('image_aspect_ratio')}`",
        *[f"- {line}" for line in summary_lines],
        "",
        "## Use",
        "",
        "```python",
        "from mlx_llava import load, generate",
        "",
        'model, processor = load("path/to/this/model")',
        'print(generate(model, processor, "What is in the image?", image="photo.jpg"))',
        "```",
        "",
        "or `mlx-llava generate --model path/to/this/model --image photo.jpg -p \"What is in the image?\"`.",
        "",
    ]
    return "\n".join(lines)


def _looks_like_repo(source: str) -> bool:
    from mlx_llava.weights import is_repo_id

    return is_repo_id(source) and not Path(source).exists()
