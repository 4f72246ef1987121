"""The `mlx-llava` command: a thin layer over the public API.

Each command module parses flags, calls `mlx_llava`, prints. Problems a user
can fix arrive as `LlavaError` and are printed as one line.
"""

import sys

import typer

app = typer.Typer(
    name="mlx-llava",
    help="LLaVA in MLX: convert, chat, generate, train, evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def register():
    """Import the command modules; each adds its commands to `app`."""
    from . import chat, convert, datagen, demo, eval, generate, train  # noqa: F401


def main():
    from mlx_llava.blas import use_system_blas

    use_system_blas()  # before mlx is imported by anything below
    from mlx_llava.errors import LlavaError

    register()
    try:
        app()
    except LlavaError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
