"""`mlx-llava serve`: the OpenAI-compatible server and its chat page."""

import signal
from typing import Annotated, Optional

import typer

from . import app, options

Opt = typer.Option


@app.command()
def serve(
    model: options.Model = None,
    quantize: options.Quantize = False,
    host: Annotated[str, Opt("--host", help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, Opt("--port", help="Port to listen on.")] = 8080,
    api_key: Annotated[Optional[str], Opt("--api-key", envvar="MLX_LLAVA_API_KEY", help="Require this key (Authorization: Bearer KEY); also $MLX_LLAVA_API_KEY.")] = None,
    max_batch: Annotated[int, Opt("--max-batch", help="Most requests decoded together.")] = 8,
    max_queue: Annotated[int, Opt("--max-queue", help="Most requests waiting for a place in the batch; more are refused (503, Retry-After).")] = 64,
    max_body_mb: Annotated[float, Opt("--max-body-mb", help="Largest request body (and image file), in MB; larger: 413.")] = 32.0,
    max_image_pixels: Annotated[int, Opt("--max-image-pixels", help="Largest image, width x height, checked before decoding; larger: 413.")] = 25_000_000,
    allow_local_files: Annotated[bool, Opt("--allow-local-files", help="Let requests name image files on this machine (paths or file:// URLs).")] = False,
    prefix_cache_mb: Annotated[float, Opt("--prefix-cache-mb", help="Memory for KV caches of shared prefixes (images, history) reused across requests; 0: off.")] = 1024.0,
    model_id: Annotated[Optional[str], Opt("--model-id", help="The model's name in the API (default: the --model as given).")] = None,
    log_level: Annotated[str, Opt("--log-level", help="debug (with an access log), info, warning or error.")] = "info",
):
    """Serve a model: OpenAI's /v1/chat/completions (streaming, images, continuous batching) and a chat page at /."""
    from mlx_llava.errors import need

    need(0 <= port <= 65535, f"--port must be from 1 to 65535 (or 0: a free one), not {port}")
    need(max_batch >= 1, f"--max-batch must be 1 or more, not {max_batch}")
    need(max_queue >= 0, f"--max-queue must be 0 or more, not {max_queue}")
    need(max_body_mb > 0, f"--max-body-mb must be more than 0, not {max_body_mb}")
    need(max_image_pixels > 0, f"--max-image-pixels must be more than 0, not {max_image_pixels}")
    need(prefix_cache_mb >= 0, f"--prefix-cache-mb must be 0 or more, not {prefix_cache_mb}")
    need(log_level in ("debug", "info", "warning", "error"), f"--log-level must be debug, info, warning or error, not {log_level!r}")
    need(api_key is None or api_key.strip() != "", "--api-key must not be empty")
    from mlx_llava import serve as server

    server._need_stack()
    llava, processor = options.load(model, quantize)
    settings = server.Settings(
        model_id=model_id or server.model_name(model), api_key=api_key, max_batch=max_batch, max_queue=max_queue,
        max_body_mb=max_body_mb, max_image_pixels=max_image_pixels, allow_local_files=allow_local_files,
        prefix_cache_mb=prefix_cache_mb,
    )
    # uvicorn takes SIGINT and SIGTERM while it serves (stop listening, finish
    # the running requests) and raises them again when done: that second one
    # must not turn a clean stop into an error.
    quiet = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(llava, processor, settings, host, port, log_level,
                   on_ready=lambda s: typer.echo(f"mlx-llava: serving {settings.model_id} on "
                                                 f"http://{host}:{s.servers[0].sockets[0].getsockname()[1]} "
                                                 "(chat page at /, API at /v1)", err=True))
    finally:
        for s, handler in quiet.items():
            signal.signal(s, handler)
    typer.echo("mlx-llava: stopped", err=True)
