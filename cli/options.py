"""Flags shared by several commands, declared once."""

from contextlib import contextmanager
from typing import Annotated, Optional

import typer

Model = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Model folder or hub repo id (MLX, or a PyTorch LLaVA converted on first use). Default: the shipped demo model."),
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


Quantize = Annotated[bool, typer.Option("-q", "--quantize", help="Use a 4-bit copy (made once, kept in the cache).")]


def load(model, quantize: bool = False):
    """Load a model for a command: the shipped demo model when none is named;
    a PyTorch checkpoint is converted on first use (see mlx_llava.convert.cache)."""
    import mlx_llava
    from mlx_llava.weights import default_model

    if model is None:
        return mlx_llava.load(default_model())
    from mlx_llava.convert.cache import prepared

    with conversion_progress() as on_tensor:
        path = prepared(model, quantize=quantize, say=lambda line: typer.echo(line, err=True), on_tensor=on_tensor)
    return mlx_llava.load(path)


@contextmanager
def conversion_progress():
    """A progress bar on stderr, fed by `convert`'s on_tensor(name, done, total):
    on a terminal only, from the first tensor on, and gone when done."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    console = Console(stderr=True)
    bar = Progress(TextColumn("converting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.description}"), console=console, transient=True)
    task = bar.add_task("", total=None)

    def on_tensor(name, done, total):
        if not console.is_terminal:  # elsewhere a bar leaves an empty line behind
            return
        if not bar.live.is_started:
            bar.start()
        bar.update(task, completed=done, total=total, description=name)

    try:
        yield on_tensor
    finally:
        if bar.live.is_started:
            bar.stop()


def describe(processor, conv_mode=None, image=None):
    """What --verbose says about the model (and `image`'s visual tokens) before it answers."""
    import typer

    config = processor.image_config
    if processor.anyres is None:
        tokens = f"{processor.num_visual_tokens} visual tokens each"
    else:
        tokens = f"crops on a grid of {len(processor.anyres.pinpoints)} pinpoints, visual tokens by image size"
        if image is not None:
            from mlx_llava.image import load_image

            picture = load_image(image)
            size = (picture.height, picture.width)
            rows, cols = processor.anyres.grid(size)
            tokens += (f"; this {size[1]}x{size[0]} image: {rows}x{cols} crops + the whole, "
                       f"{processor.visual_tokens(size)} visual tokens")
    typer.echo(f"template: {conv_mode or processor.conv_mode}; images: {config.image_aspect_ratio} to "
               f"{config.crop_size[1]}x{config.crop_size[0]}, {tokens}", err=True)


def start(model, quantize, image, conv_mode, verbose, **sampling):
    """What `generate` and `chat` do before the first answer: every option and
    the image checked before anything slow, then the model loaded (and, with
    --verbose, described). -> (model, processor, image)."""
    from mlx_llava.errors import check_sampling
    from mlx_llava.image import load_image

    check_sampling(**sampling)
    check_conv_mode(conv_mode)
    image = load_image(image) if image is not None else None
    llava, processor = load(model, quantize)
    if verbose:
        describe(processor, conv_mode, image)
    return llava, processor, image
