"""`mlx-llava generate`: one answer, streamed to the terminal."""

from typing import Annotated, Optional

import typer

from . import app, options


@app.command()
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The question.")],
    image: options.ImagePath = None,
    model: options.Model = None,
    quantize: options.Quantize = False,
    max_tokens: options.MaxTokens = 256,
    temperature: options.Temperature = 0.0,
    top_p: options.TopP = 1.0,
    seed: options.Seed = None,
    repetition_penalty: options.RepetitionPenalty = None,
    conv_mode: options.ConvMode = None,
    system: options.System = None,
    verbose: options.Verbose = False,
    prompt_cache: Annotated[Optional[str], typer.Option(
        "--prompt-cache", help="A .safetensors file for the image's and the system prompt's KV cache: "
        "reused when it exists (it must come from this model and image), else written after the answer.")] = None,
):
    """Answer one question about an image (or none)."""
    if prompt_cache is not None:  # before the slow part, as every other option
        from mlx_llava.errors import check_output

        check_output(prompt_cache, [], "--prompt-cache", folder=False)
    llava, processor, image = options.start(model, quantize, image, conv_mode, verbose, max_tokens=max_tokens,
                                            temperature=temperature, top_p=top_p, seed=seed,
                                            repetition_penalty=repetition_penalty)
    from mlx_llava.generate import speed_line, stream_generate

    last = None
    for last in stream_generate(
        llava, processor, prompt, image,
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
        repetition_penalty=repetition_penalty, conv_mode=conv_mode, system=system,
        prompt_cache=prompt_cache,
    ):
        print(last.text, end="", flush=True)
    print()
    if verbose and last is not None:
        print(speed_line(last))
