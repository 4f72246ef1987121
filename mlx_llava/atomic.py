"""Files and folders that appear whole or not at all.

Everything is written under a temporary name beside its destination and
renamed into place when complete (a rename is atomic on one file system), so
a killed process, a full disk or an error never leaves a half-written file
where a complete one is expected; on failure the temporary is removed.
"""

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import LlavaError, write_failure


@contextmanager
def file(path, what: str = ""):
    """Yield a temporary path beside `path` (its folder made if missing); it
    replaces `path` when the block ends well. A failed write (a full disk, a
    read-only folder) is one LlavaError line ("cannot write {what}{path}")."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # as check_output allows, and folder() does
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        why = write_failure(e)
        if why:
            raise LlavaError(f"cannot write {what}{path}: {why}") from None
        raise
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
def folder(path, tag: str = "saving", overwrite: bool = False, what: str = ""):
    """Yield a new temporary folder beside `path`, `.NAME.TAG-PID-xxxxxxxx`; it
    becomes `path` when the block ends well (replacing an existing one only
    with `overwrite`, and only once the new one is complete). On any failure
    it is removed; a failed write (a full disk) is one LlavaError line
    ("cannot write {what}{path}"). Folders of ours an earlier run left behind
    (killed, or the machine lost power) are removed first, when stale."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _staging(path, tag)
    except OSError as e:
        raise LlavaError(f"cannot write {what}{path}: {write_failure(e)}") from None
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would outlive the rename
        yield tmp
        if path.exists():
            if not overwrite:
                raise LlavaError(f"{path} already exists")
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = write_failure(e)
        if why:
            raise LlavaError(f"cannot write {what}{path}: {why}") from None
        raise


def _staging(out: Path, tag: str) -> Path:
    """A new temporary folder beside `out`, after removing the stale ones of
    ours: by name, and only when their process is gone (or, for a name
    without a pid, untouched for a day)."""
    prefix = f".{out.name}.{tag}-"
    for old in out.parent.iterdir():
        if old.name.startswith(prefix) and old.is_dir() and _stale(old, old.name[len(prefix):]):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=out.parent))


def _stale(folder: Path, rest: str) -> bool:
    pid, sep, _ = rest.partition("-")
    if sep and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except (ProcessLookupError, OverflowError):
            return True
        except PermissionError:  # alive, and someone else's
            return False
        return False
    return time.time() - folder.stat().st_mtime > 24 * 3600
