"""Which part of the real stage 2 slows the demo's "where" lookup?

A diagnostic for the demo model's gap (research/NOTES.md): the lab of
`research/lookup_clip.py` (the recipe's LLaMA shape, a projector, Muon at
lr 0.005, exact one-hot symbols of each cell, "where" about every object of
every training scene, held out on the 300 test scenes) moved toward the real
stage 2 one part at a time: the build's tokenizer, the question in the
world's words ("Where is the red star located?"), the chat template and the
short-answer instruction around it, the answer in words with the
end-of-sequence token ("top left</s>"), and a pretrained language model.

    python research/lookup_chat.py build=demo-build                    # as the real stage 2 lays it out
    python research/lookup_chat.py build=demo-build chat=0 short=0     # BOS, image, question, answer
    python research/lookup_chat.py build=demo-build answer=first       # train and score the first answer token only
    python research/lookup_chat.py build=demo-build answer=one         # each place as one token (ids borrowed)
    python research/lookup_chat.py build=demo-build lm=demo-build/language_model   # the recipe's pretrained LM
    python research/lookup_chat.py build=demo-build lm=demo-build/language_model reset=self_attn
        # ... with the weights whose names hold one of these (comma-separated) drawn afresh

Prints held-out exact match (every answer token right, as greedy decoding
would need) and first-token accuracy every 250 steps.
"""

import mlx_llava  # noqa: F401  (before mlx: the system BLAS on Linux)

import random
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from lookup import FEATURES, Lookup, make_optimizer, parse, redraw
from lookup_clip import LAB, asked, place, read_scenes, symbols

from mlx_llava.conversation import IGNORE_INDEX, build_targets
from mlx_llava.demo.rules import SHORT_ANSWER
from mlx_llava.train.data import Example, pad

SETTINGS = dict(build="", steps=1000, batch=16, seed=0, lr=5e-4, muon=0.005, chat=1, short=1, answer="words",
                lm="", reset="", heads=4, layers=4, hidden=128, every=250)
IMAGE = 0  # the visual tokens' placeholder id (<unk>); its embeddings are replaced by the projector's


def sample(tokenizer, s, o, rng) -> tuple:
    """(input_ids, labels) for "where is <o>?" as the settings lay it out."""
    question = rng.choice([f"Where is the {o.name}?", f"Where is the {o.name} located?",
                           f"Where is the {o.name} in the image?"]) + (f"\n{SHORT_ANSWER}" if s["short"] else "")
    if s["chat"]:
        turns = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": o.position}]
        ids, labels = build_targets(tokenizer, turns, "vicuna_v1", IMAGE, 9)
    else:
        q = tokenizer.encode(question, add_special_tokens=False)
        a = tokenizer.encode(o.position, add_special_tokens=False) + [tokenizer.eos_token_id]
        ids = [tokenizer.bos_token_id, *[IMAGE] * 9, *q, *a]
        labels = [IGNORE_INDEX] * (10 + len(q)) + a
    k = next(i for i, x in enumerate(labels) if x != IGNORE_INDEX)  # the first answer token
    if s["answer"] == "first":
        return ids[:k + 1], labels[:k + 1]
    if s["answer"] == "one":
        one = len(tokenizer._tokenizer) - 9 + place(o)
        return ids[:k] + [one, tokenizer.eos_token_id], labels[:k] + [one, tokenizer.eos_token_id]
    return ids, labels


def dataset(tokenizer, s, scenes, rng) -> list:
    """A question about each object `asked`: (example, the scene's symbols)."""
    cells = symbols(scenes)
    return [(Example(str(n), *sample(tokenizer, s, o, rng), None), cells[n]) for n, o in asked(scenes)]


def batch(rows) -> tuple:
    """Right-padded as the trainer pads (`mlx_llava.train.data.pad`), with the symbols."""
    ids, labels = pad([example for example, _ in rows])
    return mx.array(ids), mx.array(labels), mx.array(np.stack([cells for _, cells in rows]))


def loss(model, ids, labels, cells):
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    ce = nn.losses.cross_entropy(model(ids, cells)[:, :-1], mx.where(mask, targets, 0)) * mask
    return ce.sum() / mask.sum()


def score(model, ids, labels, cells) -> tuple:
    """(exact match, first answer token right) under teacher forcing."""
    guess, targets = model(ids, cells)[:, :-1].argmax(-1), labels[:, 1:]
    mask = targets != IGNORE_INDEX
    first = mx.argmax(mask, -1)[:, None]
    exact = mx.where(mask, guess == targets, True).all(-1).mean().item()
    return exact, (mx.take_along_axis(guess, first, 1) == mx.take_along_axis(targets, first, 1)).mean().item()


def main(argv):
    s = parse(argv, SETTINGS, "lookup_chat.py")
    if s["answer"] not in ("words", "first", "one"):
        raise SystemExit(f"lookup_chat.py: answer={s['answer']!r}; words, first or one")
    if s["reset"] and not s["lm"]:
        raise SystemExit("lookup_chat.py: reset= re-initialises part of a pretrained language model; give lm=DIR")
    build = Path(s["build"])
    if not (build / "tokenizer" / "tokenizer.json").is_file():
        raise SystemExit(f"lookup_chat.py: {build} is not a demo build (no tokenizer); build=DIR")
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tokenizer = load_tokenizer(build / "tokenizer")
    train, test = read_scenes(build)
    rng = random.Random(s["seed"])
    train_rows, test_rows = dataset(tokenizer, s, train, rng), dataset(tokenizer, s, test, rng)

    mx.random.seed(s["seed"])
    model = Lookup({**LAB, "heads": s["heads"], "layers": s["layers"], "hidden": s["hidden"]}, features=FEATURES,
                   vocab=len(tokenizer._tokenizer))
    model.image_at = train_rows[0][0].input_ids.index(IMAGE)  # the same in every sample: the prompt before it is fixed
    if s["lm"]:
        from mlx_lm.utils import load_model

        model.lm = load_model(Path(s["lm"]))[0]
        if s["reset"]:
            redraw(model.lm, s["reset"])
    opt = make_optimizer(s["lr"], s["muon"])
    step = nn.value_and_grad(model, loss)
    held_out = batch(test_rows)
    print(s, f"{len(train_rows)} training questions, {len(test_rows)} held-out; first:",
          repr(tokenizer.decode([i for i in train_rows[0][0].input_ids if i != IMAGE])), flush=True)
    draw = np.random.default_rng(s["seed"])
    tic = time.time()
    for i in range(1, s["steps"] + 1):
        value, grads = step(model, *batch([train_rows[j] for j in draw.integers(0, len(train_rows), s["batch"])]))
        opt.update(model, grads)
        mx.eval(value, model.parameters(), opt.state)
        if i % s["every"] == 0:
            exact, first = score(model, *held_out)
            print(f"step {i}: loss {value.item():.3f}  held-out exact {exact:.2f}  first token {first:.2f}  "
                  f"({time.time() - tic:.0f}s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
