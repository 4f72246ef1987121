"""The rule-based teacher: the paper's three response types from a scene's symbols.

LLaVA made its instruction data by showing a text-only GPT-4 each COCO
image's captions and boxes and asking for a conversation, a detailed
description and complex reasoning. In the synthetic world the symbols are
exact, so rules play the teacher: every answer is true by construction, and
tests check that against the pixels.

Short answers are what the held-out evaluation scores by exact match, so
each question family has a canonical short answer ("red", "triangle", "3",
"top left", "yes", "red circle"). As in LLaVA-1.5, a question followed by
SHORT_ANSWER asks for it; the same question without the suffix gets a full
sentence. Conversations mix both, so the model learns when to be brief.

Words: "color" in the English the model reads (as in LLaVA's data), "colour"
in code and in the question kind.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..conversation import IMAGE_PLACEHOLDER
from ..datagen.prompts import DETAIL_INSTRUCTIONS
from .world import (
    AT,
    COLOURS,
    NUMBER_WORDS,
    PLURALS,
    SHAPES,
    Object,
    Scene,
    article,
    join,
)

SHORT_ANSWER = "Answer the question using a single word or phrase."
TYPES = ("conversation", "detail", "reasoning")
KINDS = ("colour", "shape", "count", "position", "relation")  # what eval_questions asks
# relation -> (grid axis, sign): a is `relation` b when sign * (a - b) > 0 on that axis
RELATIONS = {"to the left of": (1, -1), "to the right of": (1, 1), "above": (0, -1), "below": (0, 1)}
OPPOSITE = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}
TEXTURE_PHRASE = {
    "plain": "",
    "noise": " with a faint grainy texture",
    "gradient": " with a soft vertical gradient",
}


@dataclass
class QA:
    kind: str
    question: str
    short: str  # the canonical answer, scored by exact match
    long: str  # the same fact as a sentence


def cap(text: str) -> str:
    return text[0].upper() + text[1:]


def number(n: int, noun: str) -> str:
    """'no circles', 'one circle', 'three circles'."""
    if n == 1:
        return f"one {noun}"
    return f"{'no' if n == 0 else NUMBER_WORDS[n]} {PLURALS.get(noun, noun + 's')}"


def holds(a: Object, relation: str, b: Object) -> bool:
    axis, sign = RELATIONS[relation]
    return sign * (a.cell[axis] - b.cell[axis]) > 0


def ref(scene: Scene, o: Object, rng: random.Random) -> str:
    """A phrase naming exactly one object: 'the circle' if it is the only one, else 'the red circle'."""
    if scene.count(shape=o.shape) == 1 and rng.random() < 0.5:
        return f"the {o.shape}"
    return f"the {o.name}"


# ------------------------------------------------------------ question families


def ask_colour(scene: Scene, rng: random.Random) -> QA:
    o = rng.choice(scene.objects)
    if scene.count(shape=o.shape) == 1 and rng.random() < 0.5:
        subject = f"the {o.shape}"
    else:
        subject = f"the shape {AT[o.position]}"
    q = rng.choice([f"What color is {subject}?", f"What is the color of {subject}?"])
    return QA("colour", q, o.colour, f"{cap(subject)} is {o.colour}.")


def ask_shape(scene: Scene, rng: random.Random) -> QA:
    o = rng.choice(scene.objects)
    if scene.count(colour=o.colour) == 1 and rng.random() < 0.5:
        q, subject = f"What shape is the {o.colour} object?", f"the {o.colour} object"
    else:
        at = AT[o.position]
        q, subject = rng.choice([f"What shape is {at}?", f"Which shape is {at}?"]), f"the shape {at}"
    return QA("shape", q, o.shape, f"{cap(subject)} is {article(o.shape)} {o.shape}.")


def ask_count(scene: Scene, rng: random.Random) -> QA:
    r = rng.random()
    if r < 1 / 3:
        n, noun = len(scene.objects), "shape"
        q = rng.choice(["How many shapes are there?", "How many objects are in the image?"])
    elif r < 2 / 3:  # mostly shapes that are there; sometimes one that is not (answer 0)
        noun = rng.choice([o.shape for o in scene.objects]) if rng.random() < 0.8 else rng.choice(SHAPES)
        n, q = scene.count(shape=noun), f"How many {PLURALS[noun]} are there?"
    else:
        colour = (
            rng.choice([o.colour for o in scene.objects]) if rng.random() < 0.8 else rng.choice(list(COLOURS))
        )
        n, noun, q = scene.count(colour=colour), f"{colour} shape", f"How many {colour} shapes are there?"
    verb = "is" if n == 1 else "are"
    return QA("count", q, str(n), f"There {verb} {number(n, noun)} in the image.")


def ask_position(scene: Scene, rng: random.Random, o: Object | None = None) -> QA:
    """Where is `o` (by default one drawn at random)?"""
    o = o if o is not None else rng.choice(scene.objects)
    r = ref(scene, o, rng)
    q = rng.choice([f"Where is {r}?", f"Where is {r} located?", f"Where is {r} in the image?"])
    return QA("position", q, o.position, f"{cap(r)} is {AT[o.position]} of the image.")


def ask_relation(scene: Scene, rng: random.Random) -> QA | None:
    objs = scene.objects
    if len(objs) < 2:
        return None
    triples = [(a, rel, b) for a in objs for b in objs if a is not b for rel in RELATIONS]
    # "Which object is left of B?" when exactly one is; else a balanced yes/no question.
    unique = [(rel, b) for rel in RELATIONS for b in objs if sum(holds(c, rel, b) for c in objs) == 1]
    if unique and rng.random() < 0.3:
        rel, b = rng.choice(unique)
        (c,) = [c for c in objs if holds(c, rel, b)]
        rb = ref(scene, b, rng)
        return QA("relation", f"Which object is {rel} {rb}?", c.name, f"The {c.name} is {rel} {rb}.")
    yes = [t for t in triples if holds(*t)]
    no = [t for t in triples if not holds(*t)]
    a, rel, b = rng.choice(yes if rng.random() < 0.5 else no)
    ra, rb = ref(scene, a, rng), ref(scene, b, rng)
    q = f"Is {ra} {rel} {rb}?"
    if holds(a, rel, b):
        return QA("relation", q, "yes", f"Yes, {ra} is {rel} {rb}.")
    if holds(a, OPPOSITE[rel], b):
        return QA("relation", q, "no", f"No, {ra} is {OPPOSITE[rel]} {rb}.")
    line = "column" if RELATIONS[rel][0] == 1 else "row"
    return QA("relation", q, "no", f"No, {ra} and {rb} are in the same {line}.")


def ask_existence(scene: Scene, rng: random.Random) -> QA:
    present = {(o.colour, o.shape): o for o in scene.objects}
    if rng.random() < 0.5:
        o = rng.choice(scene.objects)
        q = f"Is there {article(o.name)} {o.name} in the image?"
        return QA("existence", q, "yes", f"Yes, there is {article(o.name)} {o.name} {AT[o.position]}.")
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    name = " ".join(rng.choice(absent))
    return QA(
        "existence",
        f"Is there {article(name)} {name} in the image?",
        "no",
        f"No, there is no {name} in the image.",
    )


def ask_size(scene: Scene, rng: random.Random) -> QA:
    o = rng.choice(scene.objects)
    r = ref(scene, o, rng)
    q = rng.choice([f"Is {r} small or large?", f"Is {r} large or small?"])
    return QA("size", q, o.size, f"{cap(r)} is {o.size}.")


def ask_background(scene: Scene, rng: random.Random) -> QA:
    bg = scene.background
    q = rng.choice(["What color is the background?", "What is the color of the background?"])
    return QA("background", q, bg, f"The background is {bg}.")


FAMILIES = {
    "colour": ask_colour,
    "shape": ask_shape,
    "count": ask_count,
    "position": ask_position,
    "relation": ask_relation,
    "existence": ask_existence,
    "size": ask_size,
    "background": ask_background,
}


# ------------------------------------------------------------ the three types


def _sample(scene: Scene, kind: str, turns: list[tuple[str, str]]) -> dict:
    conversations = []
    for i, (question, answer) in enumerate(turns):
        human = f"{IMAGE_PLACEHOLDER}\n{question}" if i == 0 else question
        conversations += [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]
    return {
        "id": Path(scene.file_name).stem,
        "image": scene.file_name,
        "type": kind,
        "conversations": conversations,
    }


def conversation(scene: Scene, rng: random.Random, short_p: float = 0.7) -> dict:
    """One turn of every question family, in random order; each is short-answer
    with probability short_p. A long conversation per image, as LLaVA-1.5 packs
    all of an image's VQA questions into one: more answers per image read,
    which is what a small model at a small budget needs most."""
    kinds = [k for k in FAMILIES if k != "relation" or len(scene.objects) > 1]
    turns = []
    for kind in rng.sample(kinds, len(kinds)):
        qa = FAMILIES[kind](scene, rng)
        if rng.random() < short_p:
            turns.append((f"{qa.question}\n{SHORT_ANSWER}", qa.short))
        else:
            turns.append((qa.question, qa.long))
    return _sample(scene, "conversation", turns)


def describe(scene: Scene) -> str:
    """Every object (position, size, colour, shape) and the background, in reading order."""
    n, bg = len(scene.objects), scene.background
    texture = TEXTURE_PHRASE[scene.texture]
    lines = [f"The image shows {number(n, 'shape')} on {article(bg)} {bg} background{texture}."]
    for o in scene.objects:
        lines.append(f"{cap(AT[o.position])} there is {article(o.size)} {o.size} {o.colour} {o.shape}.")
    if n > 1:
        tally = [number(c, s) for s in SHAPES if (c := scene.count(shape=s))]
        lines.append(f"Altogether the image holds {join(tally)}.")
    return " ".join(lines)


def detail(scene: Scene, rng: random.Random) -> dict:
    return _sample(scene, "detail", [(rng.choice(DETAIL_INSTRUCTIONS), describe(scene))])


def reason_corner(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    corner = rng.choice(["top left", "top right", "bottom left", "bottom right"])
    s = scene.image_size - 1
    point = (s if "right" in corner else 0, s if "bottom" in corner else 0)
    dist = sorted(
        (((o.center[0] - point[0]) ** 2 + (o.center[1] - point[1]) ** 2) ** 0.5, i)
        for i, o in enumerate(scene.objects)
    )
    if len(dist) > 1 and dist[1][0] - dist[0][0] < 3:
        return None  # too close to call
    o = scene.objects[dist[0][1]]
    q = f"Which object is closest to the {corner.replace(' ', '-')} corner of the image?"
    if len(dist) == 1:
        return q, f"There is only one shape, so the closest object is the {o.name}."
    return q, (
        f"The {o.name} is {AT[o.position]} of the image, nearer to the {corner} corner "
        f"than any other shape. So the closest object is the {o.name}."
    )


def reason_removal(scene: Scene, rng: random.Random) -> tuple[str, str]:
    n = len(scene.objects)
    o = rng.choice(scene.objects)
    if rng.random() < 0.5:  # by colour: "the red shapes" ... "two of them are red"
        k, one, many, group = (
            scene.count(colour=o.colour),
            f"{o.colour} shape",
            f"{o.colour} shapes",
            o.colour,
        )
    else:  # by shape: "the circles" ... "two of them are circles"
        k, one, many, group = scene.count(shape=o.shape), o.shape, PLURALS[o.shape], PLURALS[o.shape]
    rest = n - k
    q = f"If the {one if k == 1 else many} were removed, how many shapes would remain?"
    which = f"one of them is the {one}" if k == 1 else f"{NUMBER_WORDS[k]} of them are {group}"
    return q, (
        f"The image has {number(n, 'shape')}, and {which}. Removing {'it' if k == 1 else 'them'} "
        f"leaves {n} - {k} = {rest}, so {rest} {'shape' if rest == 1 else 'shapes'} would remain."
    )


def reason_same_colour(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    objs = scene.objects
    if len(objs) < 2:
        return None
    q = rng.choice(["Are all the shapes the same color?", "Do all the shapes have the same color?"])
    if len({o.colour for o in objs}) == 1:
        return q, f"Yes. Every shape in the image is {objs[0].colour}, so they are all the same color."
    a = rng.choice(objs)
    b = rng.choice([o for o in objs if o.colour != a.colour])
    return q, (
        f"No. The {a.shape} {AT[a.position]} is {a.colour}, but the {b.shape} {AT[b.position]} "
        f"is {b.colour}, so the shapes are not all the same color."
    )


def reason_more(scene: Scene, rng: random.Random) -> tuple[str, str]:
    first = rng.choice([o.shape for o in scene.objects])
    second = rng.choice([s for s in SHAPES if s != first])
    c1, c2 = scene.count(shape=first), scene.count(shape=second)
    p1, p2 = PLURALS[first], PLURALS[second]
    verdict = f"yes, there are more {p1} than {p2}" if c1 > c2 else f"no, there are not more {p1} than {p2}"
    return (
        f"Are there more {p1} than {p2}?",
        f"The image has {number(c1, first)} and {number(c2, second)}, so {verdict}.",
    )


def reason_count_relation(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    if len(scene.objects) < 2:
        return None
    b = rng.choice(scene.objects)
    rel = rng.choice(list(RELATIONS))
    hits = [c for c in scene.objects if holds(c, rel, b)]
    q = f"How many shapes are {rel} the {b.name}?"
    if not hits:
        return q, f"No shape is {rel} the {b.name}, so the answer is 0."
    names = cap(join([f"the {c.name}" for c in hits]))
    return q, f"{names} {'is' if len(hits) == 1 else 'are'} {rel} the {b.name}, so the answer is {len(hits)}."


REASONS = (reason_corner, reason_removal, reason_same_colour, reason_more, reason_count_relation)


def reasoning(scene: Scene, rng: random.Random) -> dict:
    """One or two questions that need a step; answers explain, then state the fact."""
    want = 1 if rng.random() < 0.7 else 2
    turns = []
    for family in rng.sample(REASONS, len(REASONS)):
        if len(turns) < want and (qa := family(scene, rng)) is not None:
            turns.append(qa)
    return _sample(scene, "reasoning", turns)


def instruct_samples(scenes: list[Scene], seed: int = 0, short_p: float = 0.7) -> list[dict]:
    """One conversation, one detail and one reasoning sample per scene, shuffled.

    Each scene's samples depend only on (seed, scene), not on the others.
    """
    samples = []
    for scene in scenes:
        rng = random.Random(f"{seed}:{scene.id}:{scene.seed}")
        samples += [conversation(scene, rng, short_p), detail(scene, rng), reasoning(scene, rng)]
    random.Random(seed).shuffle(samples)
    return samples


# ------------------------------------------------------------ evaluation


def short_answer(scene: Scene, rng: random.Random, turns: int = 6, families: dict = None, weights: dict = None) -> dict:
    """`turns` short-answer questions of the held-out kinds about one image, each
    kind as likely unless `weights` ({kind: weight}) says otherwise:
    LLaVA-1.5's academic-task data (VQAv2, GQA), whose answers are a word or a
    phrase, several questions packed per image. `families` replaces some of
    FAMILIES' question makers (a diagnostic's variant)."""
    families = {**FAMILIES, **(families or {})}
    kinds = [k for k in KINDS if k != "relation" or len(scene.objects) > 1]
    if weights:  # a separate branch: the unweighted draws stay the recipe's, one rng.choice per turn
        qas = [families[k](scene, rng) for k in rng.choices(kinds, [weights[k] for k in kinds], k=turns)]
    else:
        qas = [families[rng.choice(kinds)](scene, rng) for _ in range(turns)]
    return _sample(scene, "short", [(f"{qa.question}\n{SHORT_ANSWER}", qa.short) for qa in qas])


def short_answer_samples(scenes: list[Scene], seed: int = 0, per_scene: int = 5, turns: int = 6,
                families: dict = None, weights: dict = None) -> list[dict]:
    """`per_scene` short-answer samples per scene, each with questions drawn afresh (so one
    pass over them never repeats a sample), shuffled."""
    samples = []
    for scene in scenes:
        rng = random.Random(f"vqa:{seed}:{scene.id}:{scene.seed}")  # the seed's old name: the same draws
        for k in range(per_scene):
            sample = short_answer(scene, rng, turns, families, weights)
            samples.append({**sample, "id": f"{sample['id']}-short{k}"})
    random.Random(seed).shuffle(samples)
    return samples


def eval_questions(scene: Scene) -> list[dict]:
    """One question per kind (no relation with a single object), with its canonical answer.

    The question already ends in "\\n" + SHORT_ANSWER; it has no <image>.
    """
    rng = random.Random(f"eval:{scene.id}:{scene.seed}")
    out = []
    for kind in KINDS:
        if (qa := FAMILIES[kind](scene, rng)) is not None:
            out.append({"question": f"{qa.question}\n{SHORT_ANSWER}", "answer": qa.short, "kind": kind})
    return out


_WORD_NUMBERS = {w: str(i) for i, w in enumerate(NUMBER_WORDS + ("ten", "eleven", "twelve"))}
_SPELLING = {"grey": "gray", "centre": "center", "colour": "color", "middle": "center"}


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation or articles, digits for number words, one spelling."""
    words = re.findall(r"[a-z0-9]+", text.lower().replace("</s>", " "))
    words = [_SPELLING.get(w, _WORD_NUMBERS.get(w, w)) for w in words if w not in ("a", "an", "the")]
    return " ".join(words)


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)
