"""`mlx-llava chat`: a streaming multi-turn REPL about an image."""

from typing import Annotated, Optional

import typer

from . import app, options

HELP = "Commands: /image PATH (new conversation about another image), /reset, /quit. Ctrl-C stops an answer."
COMMANDS = "commands: /image PATH, /reset, /quit"


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
    from mlx_llava.errors import LlavaError

    llava, processor, image = options.start(model, quantize, image, conv_mode, verbose, max_tokens=max_tokens,
                                            temperature=temperature, top_p=top_p, seed=seed,
                                            repetition_penalty=repetition_penalty)
    from mlx_llava.generate import Chat, speed_line

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
        command, _, path = line.partition(" ")
        if command == "/image":
            path = path.strip()
            try:
                if not path:
                    raise LlavaError("/image needs a path, e.g. /image cat.png")
                session.reset(path)  # a bad image leaves the conversation as it was
            except LlavaError as e:
                error(e)
                continue
            typer.echo(f"(new conversation about {path})")
            continue
        if line.startswith("/"):
            error(f"unknown command {command} ({COMMANDS})")
            continue
        last = None
        try:
            for last in session.ask(line, **sampling):
                print(last.text, end="", flush=True)
        except KeyboardInterrupt:
            typer.echo(" [stopped]", nl=False)
        except LlavaError as e:
            error(e)
            continue
        print()
        if verbose and last is not None:
            typer.echo(speed_line(last))


def error(message):
    """A problem the REPL survives: one line on stderr, and the conversation goes on."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
