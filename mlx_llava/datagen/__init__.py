"""The paper's instruction-data pipeline.

LLaVA made its data with a text-only teacher: GPT-4 read each COCO image's
captions and boxes (`coco`) and wrote conversations, detailed descriptions
and complex reasoning, prompted with the paper's system messages and
few-shot examples (`prompts`); `teacher` runs that with any OpenAI-compatible
endpoint or an mlx-lm model. Stage 1's data are image-caption pairs asked
for briefly (`captions`).
"""

from .captions import stage1_samples
from .coco import read_coco
from .prompts import BRIEF_INSTRUCTIONS, DETAIL_INSTRUCTIONS

__all__ = ["read_coco", "stage1_samples", "BRIEF_INSTRUCTIONS", "DETAIL_INSTRUCTIONS"]
