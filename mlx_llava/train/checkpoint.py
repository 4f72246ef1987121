"""Resumable training checkpoints, written atomically.

A checkpoint is a folder `step-00000100/` holding the trainable weights, the
optimizer state (which includes its step, and so the schedule's position) and
state.json. It is written under a temporary name and renamed when complete,
so a run killed mid-write leaves the previous checkpoint intact. The data
order and the random state are functions of (seed, step), so the step is all
that is needed to continue exactly.
"""

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

PREFIX = "step-"


def save(folder, step: int, model, optimizer, state: dict, keep: int):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step:08d}"
    tmp = folder / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    mx.save_safetensors(str(tmp / "trainable.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(folder) -> list:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").exists())


def load(path, model, optimizer) -> dict:
    """Restore weights and optimizer state in place; return state.json."""
    path = Path(path)
    model.load_weights(list(mx.load(str(path / "trainable.safetensors")).items()), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
    return json.loads((path / "state.json").read_text())
