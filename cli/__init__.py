"""The `mlx-llava` command: a thin layer over the public API.

Each command module parses flags, calls `mlx_llava`, prints. Every problem a
user can fix ends as one line on stderr, `error: ...`, and a non-zero exit:
a LlavaError from the library, a bad flag, a failed write (OSError), SIGTERM
or SIGHUP (which unwind like Ctrl-C, so temporary folders are removed).

Nothing slow is imported before `main` has its handlers in place: the typer
app is made on first use, and the command modules import mlx, mlx-lm and
transformers inside their functions, so `--help` and flag errors are instant.
"""

import signal
import sys


class Stopped(BaseException):
    """SIGTERM or SIGHUP: unwinds like KeyboardInterrupt (cleanups run), but
    is not caught where Ctrl-C only stops an answer."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def __getattr__(name):  # PEP 562: the typer app, made when a command module asks for it
    if name == "app":
        import typer

        global app
        app = typer.Typer(
            name="mlx-llava",
            help="LLaVA in MLX: convert, chat, generate, train, evaluate.",
            no_args_is_help=True,
            pretty_exceptions_enable=False,
            add_completion=False,
        )
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register():
    """Import the command modules; each adds its commands to `app`."""
    from . import chat, convert, datagen, demo, eval, generate, train  # noqa: F401


def fail(message: str, code: int = 1):
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    print(f"error: {'; '.join(lines) or 'failed'}", file=sys.stderr, flush=True)
    sys.exit(code)


def stop(signum, frame):
    signal.signal(signum, signal.SIG_IGN)  # a second one must not cut the cleanup short
    raise Stopped(signum)


def main():
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        run()
    except KeyboardInterrupt:  # Ctrl-C outside a command (typer handles it inside one)
        sys.exit(130)
    except Stopped as e:
        fail(f"stopped by {e}", 128 + e.signum)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run():
    import typer

    from mlx_llava.errors import LlavaError, write_failure

    register()
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as e:  # a bad flag: click's own message, on one line
        if type(e).__name__ == "NoArgsIsHelpError":  # `mlx-llava` alone: the help is the message
            print(e.format_message().rstrip())
            sys.exit(2)
        fail(e.format_message(), getattr(e, "exit_code", 2))
    except typer.Abort:
        fail("aborted")
    except LlavaError as e:
        fail(str(e))
    except (OSError, RuntimeError) as e:
        why = write_failure(e)
        if why is None:
            raise
        fail(why)
    sys.exit(code if isinstance(code, int) else 0)
