"""The synthetic world, its rule teacher and its data files.

Truth is recomputed here independently of the generator: colours from the
rendered pixels, counts from colour blobs, positions from box centres against
image thirds, relations from box-centre distances. Questions are read back by
their wording, the way a person would check them.
"""

import dataclasses
import io
import json
import re

import numpy as np
import pytest

from mlx_llava.datagen import BRIEF_INSTRUCTIONS, DETAIL_INSTRUCTIONS, read_coco, stage1_samples
from mlx_llava.demo.dataset import build_dataset
from mlx_llava.demo.rules import FAMILIES, SHORT_ANSWER, eval_questions, exact_match, instruct_samples
from mlx_llava.demo.world import BACKGROUNDS, COLOURS, layout_key, make_scenes, render, scene_from_record, split_of, write_coco
from mlx_llava.errors import LlavaError

# The paper's "brief image description" list (Liu et al. 2023, appendix).
PAPER_BRIEF = [
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
]
GRID = [
    ["top left", "top", "top right"],
    ["left", "center", "right"],
    ["bottom left", "bottom", "bottom right"],
]
POS = "top left|top right|bottom left|bottom right|top|bottom|left|right|center"
REL = "to the left of|to the right of|above|below"
SINGULAR = {
    "circles": "circle",
    "squares": "square",
    "triangles": "triangle",
    "stars": "star",
    "crosses": "cross",
}


@pytest.fixture(scope="module")
def scenes():
    large = [  # renamed: file names and ids are only unique within one make_scenes call
        dataclasses.replace(s, id=s.id + 5_000_000, file_name="large_" + s.file_name)
        for s in make_scenes(40, seed=5, image_size=96)
    ]
    return make_scenes(150, seed=11) + make_scenes(100, seed=11, split="test") + large


# ------------------------------------------------------------ independent truth


def pixels(scene):
    return np.asarray(render(scene)).astype(int)


def centre(o):
    x, y, w, h = o.bbox
    return x + w / 2, y + h / 2


def third(scene, o):
    cx, cy = centre(o)
    return GRID[int(cy * 3 // scene.image_size)][int(cx * 3 // scene.image_size)]


def pixel_colour(arr, o):
    x, y, w, h = o.bbox
    value = arr[y + h // 2, x + w // 2]
    name = min(COLOURS, key=lambda c: np.abs(value - COLOURS[c]).max())
    assert np.abs(value - COLOURS[name]).max() == 0, "objects are drawn flat"
    return name


def count_blobs(mask, min_size=4):
    """4-connected components of a boolean mask."""
    seen = np.zeros_like(mask)
    n = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        stack, size = [(y, x)], 0
        while stack:
            cy, cx = stack.pop()
            size += 1
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        n += size >= min_size
    return n


def colour_mask(arr, colour):
    return np.abs(arr - COLOURS[colour]).max(-1) == 0


def blobs(arr, colour=None):
    return sum(count_blobs(colour_mask(arr, c)) for c in ([colour] if colour else COLOURS))


def background_name(scene, arr):
    free = np.ones(arr.shape[:2], bool)
    for o in scene.objects:
        x, y, w, h = o.bbox
        free[y : y + h, x : x + w] = False
    level = arr[free].mean()
    return min(BACKGROUNDS, key=lambda b: abs(BACKGROUNDS[b] - level))


def relation(scene, a, rel, b):
    (ax, ay), (bx, by) = centre(a), centre(b)
    d = {"to the left of": bx - ax, "to the right of": ax - bx, "above": by - ay, "below": ay - by}[rel]
    s = scene.image_size
    assert abs(d) < s / 8 or abs(d) > s / 5, "relations are never borderline"
    return d > s / 5


def find(scene, arr, phrase):
    """The one object a phrase names ("the red circle", "the shape at the top left", ...)."""
    phrase = phrase.removeprefix("the ")
    if m := re.fullmatch(rf"(?:shape )?(?:at|on|in) the ({POS})", phrase):
        found = [o for o in scene.objects if third(scene, o) == m[1]]
    elif m := re.fullmatch(r"(\w+) object", phrase):
        found = [o for o in scene.objects if pixel_colour(arr, o) == m[1]]
    elif len(words := phrase.split()) == 2:
        found = [o for o in scene.objects if pixel_colour(arr, o) == words[0] and o.shape == words[1]]
    else:
        found = [o for o in scene.objects if o.shape == phrase]
    assert len(found) == 1, f"{phrase!r} names {len(found)} objects"
    return found[0]


def check_short(scene, arr, question, answer):
    """Assert a short answer is true of the scene; returns the question family."""
    q = question.removesuffix("\n" + SHORT_ANSWER)
    s = scene.image_size
    if re.fullmatch(r"What (?:color is|is the color of) the background\?", q):
        assert answer == background_name(scene, arr)
        return "background"
    if m := re.fullmatch(r"What (?:color is|is the color of) (.+)\?", q):
        assert answer == pixel_colour(arr, find(scene, arr, m[1]))
        return "colour"
    if m := re.fullmatch(r"(?:What|Which) shape is (.+)\?", q):
        assert answer == find(scene, arr, m[1]).shape
        return "shape"
    if q in ("How many shapes are there?", "How many objects are in the image?"):
        assert answer == str(blobs(arr))
        return "count"
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", q):
        assert answer == str(blobs(arr, m[1]))
        return "count"
    if m := re.fullmatch(r"How many (\w+) are there\?", q):
        assert answer == str(sum(o.shape == SINGULAR[m[1]] for o in scene.objects))
        return "count"
    if m := re.fullmatch(r"Where is (.+?)(?: located| in the image)?\?", q):
        assert answer == third(scene, find(scene, arr, m[1]))
        return "position"
    if m := re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", q):
        there = any(pixel_colour(arr, o) == m[1] and o.shape == m[2] for o in scene.objects)
        assert answer == ("yes" if there else "no")
        return "existence"
    if m := re.fullmatch(r"Is (.+) (?:small or large|large or small)\?", q):
        assert answer == ("large" if find(scene, arr, m[1]).bbox[2] > 0.3 * s else "small")
        return "size"
    if m := re.fullmatch(rf"Which object is ({REL}) (.+)\?", q):
        b = find(scene, arr, m[2])
        hits = [o for o in scene.objects if o is not b and relation(scene, o, m[1], b)]
        assert len(hits) == 1 and answer == f"{pixel_colour(arr, hits[0])} {hits[0].shape}"
        return "relation"
    if m := re.fullmatch(rf"Is (.+) ({REL}) (.+)\?", q):
        a, b = find(scene, arr, m[1]), find(scene, arr, m[3])
        assert answer == ("yes" if relation(scene, a, m[2], b) else "no")
        return "relation"
    raise AssertionError(f"unknown question: {q!r}")


# ------------------------------------------------------------ the world


def png_bytes(scene):
    buf = io.BytesIO()
    render(scene).save(buf, format="PNG")
    return buf.getvalue()


def test_deterministic_by_seed():
    a, b = make_scenes(30, seed=3), make_scenes(30, seed=3)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    assert [png_bytes(s) for s in a] == [png_bytes(s) for s in b]
    c = make_scenes(30, seed=4)
    assert [s.to_dict() for s in a] != [s.to_dict() for s in c]
    assert sum(png_bytes(x) != png_bytes(y) for x, y in zip(a, c)) > 25


def test_train_and_test_are_disjoint():
    train, test = make_scenes(1500, seed=0), make_scenes(300, seed=0, split="test")
    assert not {layout_key(s) for s in train} & {layout_key(s) for s in test}
    assert all(split_of(s) == "train" for s in train) and all(split_of(s) == "test" for s in test)
    assert not {s.id for s in train} & {s.id for s in test}
    # ... and whatever the seeds: another seed's test set never meets this train set
    assert not {layout_key(s) for s in train} & {
        layout_key(s) for s in make_scenes(300, seed=9, split="test")
    }
    with pytest.raises(LlavaError):
        make_scenes(1, split="val")


def test_world_varies():
    many = make_scenes(400, seed=1)
    assert {len(s.objects) for s in many} == {1, 2, 3, 4}
    assert {s.background for s in many} == set(BACKGROUNDS)
    assert {s.texture for s in many} == {"plain", "noise", "gradient"}
    assert {o.shape for s in many for o in s.objects} == {"circle", "square", "triangle", "star", "cross"}
    assert any(max(s.count(shape=o.shape) for o in s.objects) > 1 for s in many)
    assert any(  # mild overlaps happen
        a.bbox[0] < b.bbox[0] + b.bbox[2]
        and b.bbox[0] < a.bbox[0] + a.bbox[2]
        and a.bbox[1] < b.bbox[1] + b.bbox[3]
        and b.bbox[1] < a.bbox[1] + a.bbox[3]
        for s in many
        for a in s.objects
        for b in s.objects
        if a is not b
    )
    assert all(len(set(s.captions)) == 5 for s in many)


def shape_ok(shape, mask):
    """Does a tight object mask look like its category? (mask is the box's pixels)"""
    h, w = mask.shape
    fill = mask.mean()
    top, bottom = int(mask[0, 0]) + int(mask[0, -1]), int(mask[-1, 0]) + int(mask[-1, -1])
    apex = mask[0, (w - 1) // 2 : w // 2 + 1].any()  # the top row's middle pixel(s)
    if shape == "square":
        return fill > 0.97 and top == bottom == 2
    if shape == "circle":
        return 0.7 < fill < 0.85 and top == bottom == 0
    if shape == "triangle":
        return 0.45 < fill < 0.6 and top == 0 and bottom == 2 and apex
    if shape == "cross":
        return 0.5 < fill < 0.7 and top == bottom == 0 and mask[h // 2].all() and mask[:, w // 2].all()
    if shape == "star":
        return 0.38 < fill < 0.52 and top == bottom == 0 and not mask[h // 2].all() and apex
    raise AssertionError(shape)


def test_annotations_match_pixels(scenes):
    for scene in scenes:
        arr, s = pixels(scene), scene.image_size
        for o in scene.objects:
            x, y, w, h = o.bbox
            assert 0 <= x and 0 <= y and x + w <= s and y + h <= s
            assert pixel_colour(arr, o) == o.colour  # the centre pixel: never covered
            assert third(scene, o) == o.position
            alone = colour_mask(pixels(dataclasses.replace(scene, objects=[o])), o.colour)
            ys, xs = np.nonzero(alone)
            assert (xs.min(), ys.min(), xs.max(), ys.max()) == (x, y, x + w - 1, y + h - 1)  # tight box
            assert shape_ok(o.shape, alone[y : y + h, x : x + w]), (o, scene.id)
            in_scene = colour_mask(arr, o.colour)[y : y + h, x : x + w]
            assert (
                in_scene.sum() >= 0.75 * alone.sum()
            )  # overlaps stay mild (a triangle may lose a base corner)
        for colour in COLOURS:  # one blob per object: same colours never merge
            assert blobs(arr, colour) == scene.count(colour=colour)


# ------------------------------------------------------------ the rule teacher


def test_eval_answers_are_true(scenes):
    kinds = []
    for scene in scenes:
        arr = pixels(scene)
        questions = eval_questions(scene)
        assert questions == eval_questions(scene)  # deterministic
        for q in questions:
            assert q["question"].endswith("\n" + SHORT_ANSWER) and "<image>" not in q["question"]
            assert check_short(scene, arr, q["question"], q["answer"]) == q["kind"]
            kinds.append(q["kind"])
        assert len(questions) == (5 if len(scene.objects) > 1 else 4)
    assert set(kinds) == {"colour", "shape", "count", "position", "relation"}


def check_reasoning(scene, arr, q, a):
    s = scene.image_size
    if m := re.fullmatch(r"Which object is closest to the (\w+)-(\w+) corner of the image\?", q):
        corner = (s - 1 if m[2] == "right" else 0, s - 1 if m[1] == "bottom" else 0)
        best = min(scene.objects, key=lambda o: np.hypot(*(np.subtract(centre(o), corner))))
        assert a.endswith(f"the {pixel_colour(arr, best)} {best.shape}.")
    elif m := re.fullmatch(r"If the (.+) were removed, how many shapes would remain\?", q):
        words = m[1].split()
        shape = SINGULAR.get(words[-1], words[-1])
        gone = (
            blobs(arr, words[0])
            if shape in ("shape", "shapes")
            else sum(o.shape == shape for o in scene.objects)
        )
        rest = blobs(arr) - gone
        assert a.endswith(f"so {rest} shape{'' if rest == 1 else 's'} would remain.")
    elif re.fullmatch(r"(?:Are all the shapes|Do all the shapes have) the same color\?", q):
        same = len({pixel_colour(arr, o) for o in scene.objects}) == 1
        assert a.startswith("Yes." if same else "No.")
    elif m := re.fullmatch(r"Are there more (\w+) than (\w+)\?", q):
        n1, n2 = (sum(o.shape == SINGULAR[p] for o in scene.objects) for p in (m[1], m[2]))
        assert f", so {'yes' if n1 > n2 else 'no'}, there are" in a
    elif m := re.fullmatch(rf"How many shapes are ({REL}) the (.+)\?", q):
        b = find(scene, arr, m[2])
        n = sum(relation(scene, o, m[1], b) for o in scene.objects if o is not b)
        assert a.endswith(f"the answer is {n}.")
    else:
        raise AssertionError(f"unknown reasoning question: {q!r}")


def test_instruct_samples_are_true_and_well_formed(scenes):
    samples = instruct_samples(scenes, seed=2)
    assert samples == instruct_samples(scenes, seed=2)
    by_file = {s.file_name: s for s in scenes}
    assert sorted(x["type"] for x in samples) == sorted(["conversation", "detail", "reasoning"] * len(scenes))
    short = 0
    for sample in samples:
        assert set(sample) == {"id", "image", "type", "conversations"}
        turns = sample["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and turns
        assert turns[0]["value"].startswith("<image>\n")
        assert all("<image>" not in t["value"] for t in turns[1:])
        scene = by_file[sample["image"]]
        arr = pixels(scene)
        if sample["type"] == "conversation":  # every question family once (relation needs two objects)
            assert len(turns) // 2 == len(FAMILIES) - (len(scene.objects) == 1)
        for human, gpt in zip(turns[::2], turns[1::2]):
            question = human["value"].removeprefix("<image>\n")
            if sample["type"] == "conversation" and question.endswith(SHORT_ANSWER):
                check_short(scene, arr, question, gpt["value"])
                short += 1
            elif sample["type"] == "detail":
                assert question in DETAIL_INSTRUCTIONS
                text = gpt["value"].lower()
                assert f"on a {background_name(scene, arr)} background" in text
                for o in scene.objects:
                    where = {"left": "on the left", "right": "on the right", "center": "in the center"}.get(
                        third(scene, o), f"at the {third(scene, o)}"
                    )
                    assert f"{where} there is a {o.size} {pixel_colour(arr, o)} {o.shape}." in text
            elif sample["type"] == "reasoning":
                check_reasoning(scene, arr, question, gpt["value"])
    assert short > len(scenes)


def test_short_answer_samples_are_true_and_fresh(scenes):
    from collections import Counter

    from mlx_llava.demo.rules import KINDS, short_answer_samples

    samples = short_answer_samples(scenes, seed=2, per_scene=3, turns=5)
    assert samples == short_answer_samples(scenes, seed=2, per_scene=3, turns=5)
    assert len(samples) == 3 * len(scenes) and len({s["id"] for s in samples}) == len(samples)
    by_file = {s.file_name: s for s in scenes}
    kinds, per_image = Counter(), {}
    for sample in samples:
        assert sample["type"] == "short" and set(sample) == {"id", "image", "type", "conversations"}
        turns = sample["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * 5
        assert turns[0]["value"].startswith("<image>\n") and all("<image>" not in t["value"] for t in turns[1:])
        scene = by_file[sample["image"]]
        arr = pixels(scene)
        for human, gpt in zip(turns[::2], turns[1::2]):
            question = human["value"].removeprefix("<image>\n")
            assert question.endswith("\n" + SHORT_ANSWER)
            kinds[check_short(scene, arr, question, gpt["value"])] += 1
        per_image.setdefault(sample["image"], []).append(turns)
    # an image's samples are drawn afresh, not copies of one another
    assert all(len({str(t) for t in group}) > 1 for group in per_image.values())
    assert set(kinds) == set(KINDS)  # every held-out kind, and only those


def test_short_answer_kind_weights(scenes):
    """`weights` draws the kinds in proportion; a kind of weight 0 is never asked."""
    from collections import Counter

    from mlx_llava.demo.rules import short_answer_samples

    weights = dict(colour=0, shape=1, count=1, position=1, relation=6)
    samples = short_answer_samples(scenes, seed=3, per_scene=2, turns=6, weights=weights)
    by_file = {s.file_name: s for s in scenes}
    kinds = Counter()
    for sample in samples:
        scene, turns = by_file[sample["image"]], sample["conversations"]
        arr = pixels(scene)
        for human, gpt in zip(turns[::2], turns[1::2]):
            kinds[check_short(scene, arr, human["value"].removeprefix("<image>\n"), gpt["value"])] += 1
    assert kinds["colour"] == 0 and min(kinds[k] for k in ("shape", "count", "position")) > 0
    assert kinds["relation"] > 3 * max(kinds[k] for k in ("shape", "count", "position"))


def test_exact_match():
    assert exact_match("Red.", "red")
    assert exact_match("three", "3") and exact_match("There are 3", "there are three")
    assert exact_match("The top-left", "top left")
    assert exact_match("a red circle", "red circle")
    assert exact_match(" Yes</s>", "yes")
    assert exact_match("grey", "gray") and exact_match("centre", "center")
    assert not exact_match("blue", "red")
    assert not exact_match("2", "3")
    assert not exact_match("top", "top left")


# ------------------------------------------------------------ COCO files


def test_coco_round_trip(tmp_path, scenes):
    some = scenes[:25]
    captions, instances = write_coco(some, tmp_path / "coco", "images")
    records = list(read_coco(captions, instances))
    assert [r["file_name"] for r in records] == [s.file_name for s in some]
    for record, scene in zip(records, some):
        assert record["captions"] == scene.captions
        assert [(o["category"], o["bbox"]) for o in record["objects"]] == [
            (o.shape, o.bbox) for o in scene.objects
        ]
        assert (record["width"], record["height"]) == (scene.image_size, scene.image_size)
        assert scene_from_record(record).to_dict() == scene.to_dict()
        assert (tmp_path / "coco" / "images" / scene.file_name).read_bytes() == png_bytes(scene)
    data = json.loads(instances.read_text())
    assert {c["name"] for c in data["categories"]} == {"circle", "square", "triangle", "star", "cross"}
    assert all(
        set(a) >= {"id", "image_id", "category_id", "bbox", "area", "iscrowd"} for a in data["annotations"]
    )


def test_read_real_coco_layout(tmp_path):
    """A hand-written pair in the layout of COCO 2017's annotation files."""
    images = [
        {
            "license": 3,
            "file_name": "000000391895.jpg",
            "coco_url": "http://images.cocodataset.org/val2017/000000391895.jpg",
            "height": 360,
            "width": 640,
            "date_captured": "2013-11-14 11:18:45",
            "flickr_url": "http://farm9.staticflickr.com/8186/8119368305_4e622c8349_z.jpg",
            "id": 391895,
        },
        {
            "license": 4,
            "file_name": "000000522418.jpg",
            "coco_url": "",
            "height": 480,
            "width": 640,
            "date_captured": "2013-11-14 11:38:44",
            "flickr_url": "",
            "id": 522418,
        },
    ]
    info = {
        "description": "COCO 2017 Dataset",
        "url": "http://cocodataset.org",
        "version": "1.0",
        "year": 2017,
        "contributor": "COCO Consortium",
        "date_created": "2017/09/01",
    }
    licenses = [
        {
            "url": "http://creativecommons.org/licenses/by-nc-sa/2.0/",
            "id": 3,
            "name": "Attribution-NonCommercial-ShareAlike License",
        }
    ]
    captions = {
        "info": info,
        "licenses": licenses,
        "images": images,
        "annotations": [
            {
                "image_id": 391895,
                "id": 770337,
                "caption": "A man with a red helmet on a small moped on a dirt road. ",
            },
            {
                "image_id": 522418,
                "id": 772345,
                "caption": "A woman wearing a net on her head cutting a cake. ",
            },
            {
                "image_id": 391895,
                "id": 771687,
                "caption": "Man riding a motor bike on a dirt road on the countryside.",
            },
        ],
    }
    instances = {
        "info": info,
        "licenses": licenses,
        "images": images,
        "annotations": [
            {
                "segmentation": [[376.97, 176.91, 398.81, 176.91, 396.38, 147.78]],
                "area": 12190.44,
                "iscrowd": 0,
                "image_id": 391895,
                "bbox": [359.17, 146.17, 112.45, 213.57],
                "category_id": 4,
                "id": 151091,
            },
            {
                "segmentation": {"counts": [66916, 6, 587], "size": [360, 640]},
                "area": 14107.27,
                "iscrowd": 1,
                "image_id": 391895,
                "bbox": [339.88, 22.16, 153.88, 300.73],
                "category_id": 1,
                "id": 900100391895,
            },
        ],
        "categories": [
            {"supercategory": "person", "id": 1, "name": "person"},
            {"supercategory": "vehicle", "id": 4, "name": "motorcycle"},
        ],
    }
    (tmp_path / "captions_val2017.json").write_text(json.dumps(captions))
    (tmp_path / "instances_val2017.json").write_text(json.dumps(instances))
    records = list(read_coco(tmp_path / "captions_val2017.json", tmp_path / "instances_val2017.json"))
    assert [r["id"] for r in records] == [391895, 522418]
    first, second = records
    assert first["file_name"] == "000000391895.jpg" and (first["width"], first["height"]) == (640, 360)
    assert first["captions"] == [
        "A man with a red helmet on a small moped on a dirt road.",
        "Man riding a motor bike on a dirt road on the countryside.",
    ]
    assert first["objects"] == [
        {"category": "motorcycle", "bbox": [359.17, 146.17, 112.45, 213.57]},
        {"category": "person", "bbox": [339.88, 22.16, 153.88, 300.73]},
    ]
    assert second["objects"] == [] and len(second["captions"]) == 1
    only_captions = list(read_coco(tmp_path / "captions_val2017.json"))
    assert [r["objects"] for r in only_captions] == [[], []]
    with pytest.raises(LlavaError):
        read_coco(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LlavaError):
        read_coco(tmp_path / "bad.json")
    with pytest.raises(LlavaError):
        scene_from_record(first)


# ------------------------------------------------------------ stage 1 and the folder


def test_stage1_samples():
    assert list(BRIEF_INSTRUCTIONS) == PAPER_BRIEF
    pairs = [(f"img_{i}.png", f"Caption {i}.") for i in range(200)] + [("img_0.png", "Another caption.")]
    samples = stage1_samples(pairs, seed=4)
    assert samples == stage1_samples(pairs, seed=4)
    assert samples != stage1_samples(pairs, seed=5)
    assert len({s["id"] for s in samples}) == len(samples)
    used = set()
    for (image, caption), sample in zip(pairs, samples):
        assert set(sample) == {"id", "image", "conversations"} and sample["image"] == image
        human, gpt = sample["conversations"]
        assert human["from"] == "human" and gpt == {"from": "gpt", "value": caption}
        assert human["value"].startswith("<image>\n")
        used.add(human["value"].removeprefix("<image>\n"))
    assert used == set(PAPER_BRIEF)


def test_build_dataset(tmp_path):
    meta = build_dataset(tmp_path, n_train=30, n_test=10, seed=1, image_size=64)
    assert json.loads((tmp_path / "meta.json").read_text()) == meta
    images = tmp_path / "images"
    assert len(list(images.glob("*.png"))) == 40
    stage1 = json.loads((tmp_path / "stage1.json").read_text())
    instruct = json.loads((tmp_path / "instruct.json").read_text())
    short = json.loads((tmp_path / "short_answers.json").read_text())
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert len(stage1) == 30 * 5 and len(instruct) == 30 * 3 and len(short) == 30 * 5 == meta["counts"]["short_answers"]
    assert all((images / x["image"]).exists() for x in stage1 + instruct + short + evaluation)
    assert all(x["image"].startswith("train_") for x in stage1 + instruct + short)
    assert all(x["image"].startswith("test_") for x in evaluation)
    assert {x["kind"] for x in evaluation} <= {"colour", "shape", "count", "position", "relation"}
    assert (
        len(list(read_coco(tmp_path / "coco" / "captions.json", tmp_path / "coco" / "instances.json"))) == 30
    )


def test_ask_position_asks_about_the_object_given():
    import random

    from mlx_llava.demo.rules import ask_position

    for scene in make_scenes(40, seed=5, image_size=72):
        for o in scene.objects:
            qa = ask_position(scene, random.Random(0), o)
            assert qa.short == o.position
            assert o.shape in qa.question and qa.question.startswith("Where is the ")
            if scene.count(shape=o.shape) > 1:
                assert o.colour in qa.question  # names exactly one object
