"""Flags shared by several commands, declared once."""

from typing import Optional

import typer
from typing_extensions import Annotated

Model = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Model directory or hub repo id (MLX format). Default: the shipped demo model."),
]
MaxTokens = Annotated[int, typer.Option(
    "--max-tokens", help="Most tokens to generate; -1: until the answer ends or the model's context is full.")]
Temperature = Annotated[float, typer.Option("--temperature", "--temp", help="Sampling temperature; 0 is greedy.")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling threshold (1 = off).")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Random seed for sampling.")]
RepetitionPenalty = Annotated[
    Optional[float], typer.Option("--repetition-penalty", help="Penalty for repeated tokens (e.g. 1.1).")
]
ConvMode = Annotated[
    Optional[str],
    typer.Option("--conv-mode", help="Chat template: llava_v1, vicuna_v1, plain, llava_llama_2, mistral_instruct, chat_template. Default: the model's."),
]
System = Annotated[Optional[str], typer.Option("--system", help="Replace the template's system message.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Print tokens/s and peak memory.")]
ImagePath = Annotated[Optional[str], typer.Option("--image", "-i", help="Image file or http(s) URL.")]


def check_conv_mode(conv_mode):
    """Refuse an unknown template before a model is loaded."""
    if conv_mode is not None:
        from mlx_llava.conversation import CHAT_TEMPLATE, get_template

        if conv_mode != CHAT_TEMPLATE:
            get_template(conv_mode)


def load(model):
    """Load a model for a command: the shipped demo model when none is named."""
    import mlx_llava
    from mlx_llava.weights import default_model

    return mlx_llava.load(model if model is not None else default_model())
