"""`mlx-llava chat`: a streaming multi-turn REPL about an image."""

from typing import Annotated, Optional

import typer

from . import app, options

HELP = "Commands: /image PATH (new conversation about another image), /reset, /quit. Ctrl-C stops an answer."


@app.command()
def chat(
    image: Annotated[Optional[str], typer.Argument(help="Image file or http(s) URL to talk about.")] = None,
    model: options.Model = None,
    quantize: options.Quantize = False,
    max_tokens: options.MaxTokens = 512,
    temperature: options.Temperature = 0.0,
    top_p: options.TopP = 1.0,
    seed: options.Seed = None,
    repetition_penalty: options.RepetitionPenalty = None,
    conv_mode: options.ConvMode = None,
    system: options.System = None,
    verbose: options.Verbose = False,
):
    """Chat about an image; the KV cache is kept between turns."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    from mlx_llava import Chat, LlavaError
    from mlx_llava.generate import speed_line

    llava, processor = options.load(model, quantize)
    if verbose:
        options.describe(processor, conv_mode, image)
    session = Chat(llava, processor, image, system=system, conv_mode=conv_mode)
    sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                    repetition_penalty=repetition_penalty)
    typer.echo(HELP)
    while True:
        try:
            line = input(">> ").strip()
        except EOFError:
            typer.echo()
            return
        except KeyboardInterrupt:
            typer.echo("\n(/quit to leave)")
            continue
        if not line:
            continue
        if line in ("/quit", "/exit", "/q"):
            return
        if line == "/reset":
            session.restart()
            typer.echo("(conversation cleared)")
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                session.reset(path)
            except LlavaError as e:
                typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
                continue
            typer.echo(f"(new conversation about {path})")
            continue
        if line.startswith("/"):
            typer.echo(HELP)
            continue
        last = None
        try:
            for last in session.ask(line, **sampling):
                print(last.text, end="", flush=True)
        except KeyboardInterrupt:
            typer.echo(" [stopped]", nl=False)
        except LlavaError as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            continue
        print()
        if verbose and last is not None:
            typer.echo(speed_line(last))
