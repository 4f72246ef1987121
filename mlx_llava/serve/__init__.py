"""`mlx-llava serve`: an OpenAI-compatible server with continuous batching, and a chat page.

    from mlx_llava.serve import serve
    serve("path/to/model", port=8080, api_key="secret")        # blocks; SIGTERM ends it cleanly

    from mlx_llava.serve import create_app, Settings           # the ASGI app, for any ASGI server
    app = create_app(model, processor, Settings(model_id="llava", max_batch=8))

    from mlx_llava.serve import start                          # in a background thread (notebooks, tests)
    server = start(model, processor, port=0)                   # port 0: a free one
    print(server.url); ...; server.stop()

Needs the `serve` extra (`pip install "mlx-llava[serve]"`: Starlette and
uvicorn). The parts: `protocol` (OpenAI's request and answer formats),
`images` (image URLs within limits), `scheduler` (the model thread:
continuous batching over `mlx_llava.batch`), `app` (the routes), `page.html`
(the chat page).
"""

import logging
from typing import Optional

from ..errors import LlavaError


def _need_stack():
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise LlavaError(f"the server needs its extra: pip install \"mlx-llava[serve]\" ({e.name} is missing)") from None


def __getattr__(name):  # PEP 562: the ASGI stack only when used
    if name in ("create_app", "Settings"):
        _need_stack()
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run(model, processor, settings=None, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info",
        on_ready=None):
    """Serve a loaded model until SIGTERM or Ctrl-C, which stop taking requests,
    finish the running ones and return. `on_ready(server)` is called once the
    socket listens (its port: server.servers[0].sockets[0].getsockname()[1])."""
    _need_stack()
    import uvicorn

    from .app import create_app

    app = create_app(model, processor, settings)
    logging.getLogger("mlx_llava.serve").setLevel(log_level.upper())
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s:     %(message)s")
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None,
                            access_log=log_level == "debug")
    server = uvicorn.Server(config)
    if on_ready is not None:
        startup = server.startup

        async def started(sockets=None):
            await startup(sockets)
            if server.started:
                on_ready(server)

        server.startup = started
    server.run()
    if not server.started:
        raise LlavaError(f"cannot listen on {host}:{port} (is the port in use?)")


class Background:
    """A server running in a thread of this process (`start`): `url`, `app`
    (its scheduler: `app.state.scheduler`), `stop()`; also a context manager."""

    def __init__(self, model, processor, settings=None, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning"):
        import threading

        import uvicorn

        from .app import create_app

        self.app = create_app(model, processor, settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=host, port=port, log_level=log_level,
                                                    timeout_graceful_shutdown=None, access_log=False))
        self.thread = threading.Thread(target=self.server.run, name="mlx-llava-serve", daemon=True)
        self.thread.start()
        import time

        while not self.server.started:
            if not self.thread.is_alive():
                raise LlavaError(f"cannot listen on {host}:{port} (is the port in use?)")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{host}:{self.port}"

    def stop(self):
        """Stop taking requests, finish the running ones, stop."""
        self.server.should_exit = True
        self.thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start(model, processor, settings=None, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    """Serve a loaded model from a background thread; returns a `Background` (`.url`, `.stop()`)."""
    _need_stack()
    return Background(model, processor, settings, host, port, log_level)


def serve(model: Optional[str] = None, host: str = "127.0.0.1", port: int = 8080, **settings):
    """Load `model` (a folder or hub repo in MLX format; None: the demo model) and serve it.
    `settings`: the fields of `Settings` (api_key, max_batch, max_queue, ...)."""
    _need_stack()
    import mlx_llava
    from mlx_llava.weights import default_model

    from .app import Settings

    loaded = mlx_llava.load(model or default_model())
    run(*loaded, Settings(model_id=settings.pop("model_id", None) or model_name(model), **settings), host, port)


def model_name(model: Optional[str]) -> str:
    """The id /v1/models lists: the model as named (a folder: its name), or the demo model's."""
    if model is None:
        return "mlx-llava-demo"
    from pathlib import Path

    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model
