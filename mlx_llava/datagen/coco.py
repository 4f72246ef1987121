"""COCO annotation files -> per-image records of captions and boxes.

What the paper's teacher reads: each image's five captions
(`captions_*.json`) and its objects' categories and boxes
(`instances_*.json`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from ..errors import LlavaError


def _load_json(path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise LlavaError(f"no such COCO annotation file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlavaError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise LlavaError(f"{path} is not a COCO annotation file (needs 'images' and 'annotations')")
    return data


def read_coco(captions_json=None, instances_json=None) -> Iterator[dict]:
    """Per image: {id, file_name, width, height, captions, objects: [{category, bbox}]}.

    Reads COCO 2014/2017 `captions_*.json` and `instances_*.json` (either may
    be None) as well as the files `write_coco` makes, whose extra `attributes`
    are passed through. Images come in file order; one missing from the
    instances file has no objects (as in real COCO), one missing from the
    captions file no captions. Files are read now, records made as iterated.
    """
    if captions_json is None and instances_json is None:
        raise LlavaError("read_coco needs a captions file, an instances file, or both")
    caps = _load_json(captions_json) if captions_json is not None else {"images": [], "annotations": []}
    inst = _load_json(instances_json) if instances_json is not None else {"images": [], "annotations": []}
    return _records(caps, inst)


def _records(caps: dict, inst: dict) -> Iterator[dict]:
    names = {c["id"]: c["name"] for c in inst.get("categories", [])}
    captions: dict[int, list[str]] = {}
    for a in caps["annotations"]:
        captions.setdefault(a["image_id"], []).append(a["caption"].strip())
    objects: dict[int, list[dict]] = {}
    for a in inst["annotations"]:
        obj = {"category": names.get(a["category_id"], str(a["category_id"])), "bbox": list(a["bbox"])}
        if "attributes" in a:
            obj["attributes"] = a["attributes"]
        objects.setdefault(a["image_id"], []).append(obj)
    seen = set()
    for image in caps["images"] + inst["images"]:
        if image["id"] in seen:
            continue
        seen.add(image["id"])
        record = {
            "id": image["id"],
            "file_name": image["file_name"],
            "width": image["width"],
            "height": image["height"],
            "captions": captions.get(image["id"], []),
            "objects": objects.get(image["id"], []),
        }
        if "attributes" in image:
            record["attributes"] = image["attributes"]
        yield record
