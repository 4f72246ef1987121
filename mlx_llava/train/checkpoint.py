"""Resumable training checkpoints, written atomically.

A checkpoint is a folder `step-00000100/` holding the trainable weights, the
optimizer state (which includes its step, and so the schedule's position) and
state.json. It is written under a temporary name and renamed when complete,
so a run killed mid-write leaves the previous checkpoint intact; a write that
fails (a full disk) removes its temporary folder and says so in one line. The
data order and the random state are functions of (seed, step), so the step is
all that is needed to continue exactly. state.json also records the settings
the tensors' shapes depend on, so that a resume with other ones is refused.
"""

import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .. import atomic
from ..errors import LlavaError

PREFIX = "step-"


def save(folder, step: int, model, optimizer, state: dict, keep: int):
    folder = Path(folder)
    final = folder / f"{PREFIX}{step:08d}"
    with atomic.folder(final, "saving", overwrite=True, what="checkpoint ") as tmp:
        mx.save_safetensors(str(tmp / "trainable.safetensors"), dict(tree_flatten(model.trainable_parameters())))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    for old in checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(folder) -> list:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").exists())


def state(path) -> dict:
    """A checkpoint's state.json."""
    try:
        return json.loads((Path(path) / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise LlavaError(f"cannot read checkpoint {path}: {e}") from None


def load(path, model, optimizer) -> dict:
    """Restore weights and optimizer state in place; return state.json. A
    checkpoint whose tensors do not fit the model is refused, not half-loaded."""
    path = Path(path)
    try:
        weights = mx.load(str(path / "trainable.safetensors"))
        opt_state = mx.load(str(path / "optimizer.safetensors"))
    except Exception as e:  # mlx raises RuntimeError/ValueError for missing or damaged files
        raise LlavaError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    have = dict(tree_flatten(model.trainable_parameters()))
    differ = {k for k in have if k not in weights or weights[k].shape != have[k].shape}
    differ = sorted(differ | (weights.keys() - have.keys()))
    if differ:
        raise LlavaError(f"checkpoint {path} does not fit this run's model: {len(differ)} trainable tensor(s) "
                         f"differ, e.g. {differ[0]} (was it made with other settings?)")
    model.load_weights(list(weights.items()), strict=False)
    optimizer.state = tree_unflatten(list(opt_state.items()))
    return state(path)
