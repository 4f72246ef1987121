"""Instruction data: the synthetic visual world and the paper's data pipeline.

`world` draws scenes of coloured shapes and writes them as COCO files;
`rules` plays the paper's text-only teacher on a scene's symbols, writing
conversation / detail / reasoning samples, short-answer (VQA) samples and
held-out questions;
`stage1` makes stage-1 caption instructions and builds the dataset folder.
"""

from .rules import (
    SHORT_ANSWER,
    conversation,
    detail,
    eval_questions,
    exact_match,
    instruct_samples,
    normalize_answer,
    reasoning,
    vqa_samples,
)
from .stage1 import BRIEF_INSTRUCTIONS, DETAIL_INSTRUCTIONS, build_dataset, stage1_samples
from .world import IMAGE_SIZE, Object, Scene, make_scenes, read_coco, render, scene_from_record, write_coco

__all__ = [
    "IMAGE_SIZE",
    "Object",
    "Scene",
    "make_scenes",
    "render",
    "write_coco",
    "read_coco",
    "scene_from_record",
    "SHORT_ANSWER",
    "conversation",
    "detail",
    "reasoning",
    "instruct_samples",
    "vqa_samples",
    "eval_questions",
    "exact_match",
    "normalize_answer",
    "BRIEF_INSTRUCTIONS",
    "DETAIL_INSTRUCTIONS",
    "stage1_samples",
    "build_dataset",
]
