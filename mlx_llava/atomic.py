"""Files and folders that appear whole or not at all.

Everything is written under a temporary name beside its destination and
renamed into place when complete (a rename is atomic on one file system), so
a killed process, a full disk or an error never leaves a half-written file
where a complete one is expected; on failure the temporary is removed.
"""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def file(path):
    """Yield a temporary path beside `path`; it replaces `path` when the block ends well."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path, text: str):
    with file(path) as tmp:
        tmp.write_text(text)


def write_safetensors(path, arrays: dict, metadata=None):
    import mlx.core as mx

    with file(path) as tmp:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata)


@contextmanager
def folder(path, overwrite: bool = False, prefix: str = ""):
    """Yield a new temporary folder beside `path`; it becomes `path` when the
    block ends well (replacing an existing one only with `overwrite`, and only
    once the new one is complete). `prefix` marks the temporary's name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{prefix}", dir=path.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would outlive the rename
        yield tmp
        if path.exists():
            if not overwrite:
                raise FileExistsError(path)
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
