"""How fast does the demo's tiny LLaMA learn to look up a visual cell?

A diagnostic for the demo model's gap (research/NOTES.md): the same
language model shape as the recipe (mlx-lm llama, 4 layers, width 128),
trained from scratch on the bare lookup that the world's questions need. Each
sample is BOS, 9 visual tokens (a projector over exact one-hot symbols of a
3x3 grid cell: colour, shape, place, empty), optional filler words, and one
question; the loss is on its one-token answer:

- "where <colour> <shape> ?" -> the cell's place (finding a cell by content);
- "colourof <place> ?" -> the colour there (finding a cell by place);
- with relation=F, a share F of the questions are "is <colour> <shape> <rel>
  <colour> <shape> ?" -> yes or no (two objects found by content, their
  places compared: left of, right of, above, below; half of them true).

With first=1 the question comes before the visual tokens (BOS, question,
visual tokens, filler, "?"), so each visual token can attend to it.

    python research/lookup.py steps=4000            # key=value overrides the defaults below
    python research/lookup.py steps=2000 first=1    # the question read before the image
    python research/lookup.py steps=1000 muon=0.005  # Muon for the weight matrices (lr 0.005)
    python research/lookup.py steps=3000 muon=0.005 relation=0.5  # half the questions relations

Prints held-out accuracy of each kind every 250 steps.
"""

import mlx_llava  # noqa: F401  (before mlx: the system BLAS on Linux)

import sys
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx_lm.models import llama

from mlx_llava.demo.rules import RELATIONS as RELATIONS_OF_WORLD

SETTINGS = dict(lr=5e-4, heads=4, layers=4, hidden=128, batch=16, steps=4000, filler=0, theta=10000.0, seed=0, first=0,
                muon=0.0, relation=0.0)
PAD, BOS, WHERE, COLOUR_OF, ASK, IMAGE = 0, 1, 22, 23, 24, 25
QUESTION = 3  # a question's tokens before its "?": where <colour> <shape>, or colourof <place> ?
COLOURS, SHAPES, PLACES, FILLER = 2, 8, 13, 26  # first id of each group: 6 colours, 5 shapes, 9 places
IS, YES, NO, RELATIONS = 26, 27, 28, 29  # relation=F's words, in the filler's ids (filler=0 with it)
VOCAB, FEATURES = 64, 24  # a cell's features: colour 0-5, shape 6-10, occupied 11, place 14-22, empty 23


class Lookup(nn.Module):
    def __init__(self, s, features: int = FEATURES, vocab: int = VOCAB):
        super().__init__()
        self.lm = llama.Model(llama.ModelArgs(
            model_type="llama", hidden_size=s["hidden"], num_hidden_layers=s["layers"],
            intermediate_size=3 * s["hidden"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
            rms_norm_eps=1e-5, vocab_size=vocab, rope_theta=s["theta"], tie_word_embeddings=True))
        self.projector = nn.Sequential(nn.Linear(features, s["hidden"]), nn.GELU(), nn.Linear(s["hidden"], s["hidden"]))
        self.image_at = 1 + QUESTION if s["first"] else 1  # where the 9 visual tokens start: after the question or BOS

    def __call__(self, ids, cells):
        words = self.lm.model.embed_tokens(ids)
        h = mx.concatenate([words[:, :self.image_at], self.projector(cells), words[:, self.image_at + 9:]], axis=1)
        return self.lm(ids, input_embeddings=h)


def cell_symbols(objects) -> np.ndarray:
    """(9, FEATURES) exact symbols of a 3x3 grid; `objects` as (place, colour, shape) indices."""
    cells = np.zeros((9, FEATURES), np.float32)
    cells[np.arange(9), 14 + np.arange(9)] = 1  # place
    cells[:, 23] = 1  # empty
    for p, c, s in objects:
        cells[p, [23, c, 6 + s, 11]] = [0, 1, 1, 1]
    return cells


def redraw(lm, names: str = ""):
    """Draw afresh the weights of the mlx-lm model `lm` whose names hold one of `names`
    (comma-separated; "" for all), as mlx-lm initialises the same shape."""
    from mlx.utils import tree_flatten

    fresh = tree_flatten(type(lm)(lm.args).parameters())
    lm.load_weights([(k, v) for k, v in fresh if any(n in k for n in names.split(","))], strict=False)


def make_optimizer(lr: float, muon: float):
    """AdamW; with `muon`, Muon at that lr for the weight matrices and AdamW for the rest,
    as `mlx-llava train --optimizer muon` groups them."""
    opt = optim.AdamW(lr, weight_decay=0.0)
    if muon:
        from mlx_llava.train.setup import is_matrix

        opt = optim.MultiOptimizer([optim.Muon(muon, weight_decay=0.0), opt], [is_matrix])
    return opt


def holds(a: int, relation: int, b: int) -> bool:
    """Is place a `relation` place b? The world's relations (rules.RELATIONS, in its
    order: left of, right of, above, below) on (row, column) cells."""
    axis, sign = list(RELATIONS_OF_WORLD.values())[relation]
    return sign * (divmod(a, 3)[axis] - divmod(b, 3)[axis]) > 0


def ask_relation(rng, places) -> tuple[int, int, int, int]:
    """(i, j, relation, answer): is object i `relation` object j? "yes" half the time."""
    want = rng.random() < 0.5
    while True:
        i, j = rng.choice(len(places), 2, replace=False)
        r = int(rng.integers(4))
        if holds(places[i], r, places[j]) == want:
            return i, j, r, YES if want else NO


def batch(rng, n, filler, first=0, relation=0.0):
    """n samples: (ids, one-hot cells, answer position, answer id)."""
    ids = np.full((n, 2 + (2 if relation else 1) * QUESTION + 9 + filler), PAD, np.int32)
    cells = np.zeros((n, 9, FEATURES), np.float32)
    at, answer = np.zeros(n, np.int32), np.zeros(n, np.int32)
    for b in range(n):
        k = int(rng.integers(2, 6))
        places = rng.choice(9, k, replace=False)
        objects = set()
        while len(objects) < k:  # no two objects share colour and shape
            objects.add((int(rng.integers(6)), int(rng.integers(5))))
        objects = list(objects)
        cells[b] = cell_symbols([(p, c, s) for p, (c, s) in zip(places, objects)])
        fill = list(rng.integers(FILLER, VOCAB, int(rng.integers(0, filler + 1))))
        i = int(rng.integers(k))
        p, (c, s) = places[i], objects[i]
        if relation and rng.random() < relation:
            i, j, r, answer[b] = ask_relation(rng, places)
            (ci, si), (cj, sj) = objects[i], objects[j]
            question = [IS, COLOURS + ci, SHAPES + si, RELATIONS + r, COLOURS + cj, SHAPES + sj]
        elif rng.random() < 0.5:
            question, answer[b] = [WHERE, COLOURS + c, SHAPES + s], PLACES + p
        else:
            question, answer[b] = [COLOUR_OF, PLACES + p, ASK], COLOURS + c
        image = [IMAGE] * 9
        row = [BOS, *(question + image + fill if first else image + fill + question), ASK]
        ids[b, :len(row)], at[b] = row, len(row) - 1
    return mx.array(ids), mx.array(cells), mx.array(at), mx.array(answer)


def loss(model, ids, cells, at, answer):
    logits = model(ids, cells)[mx.arange(ids.shape[0]), at]
    return nn.losses.cross_entropy(logits, answer).mean()


def parse(argv, defaults: dict, script: str) -> dict:
    """key=value arguments over `defaults`, each of its default's type; a bad one exits with one line."""
    s = dict(defaults)
    for arg in argv:
        key, _, value = arg.partition("=")
        try:
            s[key] = type(defaults[key])(value)
        except (KeyError, ValueError):
            raise SystemExit(f"{script}: bad setting {arg!r}; key=value with a key of {', '.join(defaults)}")
    return s


def main(argv):
    s = parse(argv, SETTINGS, "lookup.py")
    if s["relation"] and (s["first"] or s["filler"]):
        raise SystemExit("lookup.py: relation=F goes with first=0 and filler=0 (one question length, its own words)")
    rng = np.random.default_rng(s["seed"])
    mx.random.seed(s["seed"])
    model = Lookup(s)
    opt = make_optimizer(s["lr"], s["muon"])
    step = nn.value_and_grad(model, loss)
    ids, cells, at, answer = batch(rng, 512, s["filler"], s["first"], s["relation"])
    truth = np.array(answer)
    print(s, flush=True)
    tic = time.time()
    for i in range(1, s["steps"] + 1):
        value, grads = step(model, *batch(rng, s["batch"], s["filler"], s["first"], s["relation"]))
        opt.update(model, grads)
        mx.eval(value, model.parameters(), opt.state)
        if i % 250 == 0:
            guess = np.array(model(ids, cells)[mx.arange(512), at].argmax(-1))
            right = guess == truth
            colour = right[truth < PLACES].mean()
            yes_no = np.isin(truth, (YES, NO))
            relation = f"  relation (yes/no) {right[yes_no].mean():.2f}" if yes_no.any() else ""
            where = right[(truth >= PLACES) & ~yes_no].mean()
            print(f"step {i}: loss {value.item():.3f}  by content (where) {where:.2f}  "
                  f"by place (colour of) {colour:.2f}{relation}  ({time.time() - tic:.0f}s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
