"""`python -m mlx_llava.demo.step OUT NAME [--quiet]`: one step of the demo
recipe in a process of its own (the recipe runs two side by side), with the
recipe read from OUT/recipe.json."""

import json
import sys
from pathlib import Path

from .recipe import STEPS, Recipe


def main(argv):
    out, name = Path(argv[0]), argv[1]
    recipe = Recipe(**json.loads((out / "recipe.json").read_text()))
    log = (lambda *a: None) if "--quiet" in argv else (lambda *a: print(*a, flush=True))
    STEPS[name](out, recipe, log=log)


if __name__ == "__main__":
    main(sys.argv[1:])
