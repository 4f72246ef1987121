"""Image URLs of a request -> PIL images, within the server's limits.

`data:` URLs (base64 PNG, JPEG, WebP, ...), `http(s)` URLs (fetched with a
timeout and a size cap) and, only with --allow-local-files, local paths
(`file://` or plain). The size is read from the image's header (Pillow's
`Image.open` is lazy) and refused past `max_pixels` before any pixel is
decoded; then `mlx_llava.image.load_image` decodes it as everywhere else.
"""

import base64
import binascii
import io
import os
import urllib.error
import urllib.parse
import urllib.request

from PIL import Image

from ..errors import LlavaError
from ..image import load_image
from .protocol import APIError, bad


def open_image(url: str, max_pixels: int, max_bytes: int, allow_local_files: bool = False,
               timeout: float = 30.0) -> Image.Image:
    data, name = read(url, max_bytes, allow_local_files, timeout)
    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
    except Image.DecompressionBombError:
        raise APIError(413, f"image {name} is too large to decode", code="image_too_large") from None
    except Exception:
        raise bad(f"cannot read image {name}: not an image (unknown format or damaged header)",
                  code="invalid_image") from None
    if width * height > max_pixels:
        raise APIError(413, f"image {name} is {width}x{height} = {width * height} pixels, more than this "
                            f"server's --max-image-pixels {max_pixels}", code="image_too_large")
    try:
        return load_image(data)
    except LlavaError as e:
        raise bad(str(e).replace(f"<{len(data)} bytes>", name), code="invalid_image") from None


def read(url: str, max_bytes: int, allow_local_files: bool, timeout: float) -> tuple:
    """(the image file's bytes, a short name for messages)."""
    if url.startswith("data:"):
        return data_url(url, max_bytes), "data:" + url[5:30].split(",")[0]
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return fetch(url, max_bytes, timeout), url
    if scheme not in ("", "file") and not (len(scheme) == 1 and os.name == "nt"):
        raise bad(f"unsupported image URL scheme {scheme!r} (data:, http(s):, or a local path with "
                  "--allow-local-files)", code="invalid_image_url")
    if not allow_local_files:
        raise bad("local image paths are refused: start the server with --allow-local-files to allow them",
                  code="local_files_not_allowed")
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path) if scheme == "file" else url
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise APIError(413, f"image {path} is {size} bytes, more than {max_bytes}", code="image_too_large")
        with open(path, "rb") as f:
            return f.read(), path
    except OSError as e:
        raise bad(f"cannot read image {path}: {e.strerror or e}", code="invalid_image") from None


def data_url(url: str, max_bytes: int) -> bytes:
    head, comma, payload = url[5:].partition(",")
    if not comma or not head.endswith(";base64"):
        raise bad("an image data URL must be data:image/...;base64,...", code="invalid_image_url")
    media = head[: -len(";base64")].split(";")[0].lower()
    if media and not media.startswith("image/"):
        raise bad(f"a data URL of type {media!r} is not an image", code="invalid_image_url")
    if len(payload) * 3 // 4 > max_bytes:
        raise APIError(413, f"an image of about {len(payload) * 3 // 4} bytes is more than {max_bytes}",
                       code="image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad("an image data URL holds invalid base64", code="invalid_image_url") from None


def fetch(url: str, max_bytes: int, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "mlx-llava"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as e:
        raise bad(f"cannot fetch image {url}: HTTP {e.code} {e.reason}", code="invalid_image_url") from None
    except urllib.error.URLError as e:
        raise bad(f"cannot fetch image {url}: {e.reason}", code="invalid_image_url") from None
    except (OSError, ValueError) as e:
        raise bad(f"cannot fetch image {url}: {e}", code="invalid_image_url") from None
    if len(data) > max_bytes:
        raise APIError(413, f"image {url} is more than {max_bytes} bytes", code="image_too_large")
    return data
