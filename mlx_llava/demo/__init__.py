"""The small demo LLaVA shipped in the package, and the recipe that makes it.

`model/` holds its weights (the default of `mlx-llava chat`, `generate` and
`eval` when no --model is given), `heldout/` a sample of held-out questions
with their images, `results.json` the figures measured when it was built.
"""

import json
import shutil
from pathlib import Path

from .recipe import SHIPPED, VARIANTS, Recipe, build, evaluate_heldout, variant_dir

HERE = Path(__file__).parent
HELDOUT_SCENES = 40  # held-out images shipped with the package for a quick check


def heldout_dir() -> Path:
    return HERE / "heldout"


def install_model(build_dir, summary: dict, package_dir=HERE) -> Path:
    """Copy a build's shipped variant's model, a held-out sample and the figures into the package."""
    build_dir, package_dir = Path(build_dir), Path(package_dir)
    model = package_dir / "model"
    shutil.rmtree(model, ignore_errors=True)
    shutil.copytree(variant_dir(build_dir, SHIPPED, Recipe(**summary["recipe"])), model)
    questions = json.loads((build_dir / "data" / "eval.json").read_text())
    images = sorted({q["image"] for q in questions})[:HELDOUT_SCENES]
    sample = [q for q in questions if q["image"] in images]
    heldout = package_dir / "heldout"
    shutil.rmtree(heldout, ignore_errors=True)
    (heldout / "images").mkdir(parents=True)
    for name in images:
        shutil.copy(build_dir / "data" / "images" / name, heldout / "images" / name)
    (heldout / "questions.json").write_text(json.dumps(sample, indent=1))
    from .. import load

    shipped = evaluate_heldout(*load(model), sample, heldout / "images")
    summary = {**summary, "shipped_sample": {k: v for k, v in shipped.items() if k != "answers"}}
    (package_dir / "results.json").write_text(json.dumps(summary, indent=2))
    return model


__all__ = ["Recipe", "build", "install_model", "heldout_dir", "evaluate_heldout", "VARIANTS"]
