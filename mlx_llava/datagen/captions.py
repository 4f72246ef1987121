"""Stage-1 (feature alignment) data: image-caption pairs as brief-description instructions.

Stage 1 turns image-caption pairs into single-turn instructions: the human
asks for a brief description in one of the paper's phrasings (Liu et al.
2023, appendix table "instructions for brief image description"), the
assistant answers with the caption. Varying the instruction while the answer
stays a plain caption teaches the projector to align features, not the
language model to follow one fixed prompt.
"""

from __future__ import annotations

import random
from pathlib import Path

from ..conversation import IMAGE_PLACEHOLDER
from .prompts import BRIEF_INSTRUCTIONS


def stage1_samples(pairs, seed: int = 0) -> list[dict]:
    """(image_file, caption) pairs -> LLaVA stage-1 samples, deterministic in `seed`.

    Ids are "{image stem}_{k}" where k counts that image's captions, so an
    image with several captions gives several distinct samples.
    """
    rng = random.Random(seed)
    seen: dict[str, int] = {}
    samples = []
    for image, caption in pairs:
        stem = Path(image).stem
        k = seen[stem] = seen.get(stem, -1) + 1
        samples.append(
            {
                "id": f"{stem}_{k}",
                "image": str(image),
                "conversations": [
                    {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{rng.choice(BRIEF_INSTRUCTIONS)}"},
                    {"from": "gpt", "value": caption},
                ],
            }
        )
    return samples
