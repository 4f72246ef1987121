"""The processor: prompt text + images -> model inputs, and back to text.

It pairs the model's tokenizer (mlx-lm's wrapper, for streaming
detokenization) with the image preprocessing and the conversation template,
so that `processor(prompt, images)` gives llava-hf style inputs: each
`<image>` expanded to the visual tokens it becomes.

LLaVA v1 models trained with `mm_use_im_start_end` saw each image between
`<im_start>` and `<im_end>` tokens; config.json says so, and `encode` then
wraps every `<image>` in them, as the original's prompts do.
"""

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx_lm.tokenizer_utils import load as load_tokenizer

from . import conversation
from .errors import LlavaError
from .image import ImageConfig, preprocess

IM_START_END = ("<im_start>", "<im_end>")  # the original's DEFAULT_IM_START_TOKEN / DEFAULT_IM_END_TOKEN


class Processor:
    def __init__(self, tokenizer, image_config: ImageConfig, image_token_index: int,
                 num_visual_tokens: int, conv_mode: str, context_length: int,
                 image_wrap: Optional[tuple] = None):
        self.tokenizer = tokenizer
        self.image_wrap = image_wrap  # (before, after) each <image>, e.g. ("<im_start>", "<im_end>")
        self.image_config = image_config
        self.image_token_index = image_token_index
        self.num_visual_tokens = num_visual_tokens
        self.conv_mode = conv_mode
        self.context_length = context_length

    @classmethod
    def from_dir(cls, path, config: dict):
        path = Path(path)
        try:
            tokenizer = load_tokenizer(path, eos_token_ids=config.get("text_config", {}).get("eos_token_id"))
        except Exception as e:  # transformers raises many kinds for a missing/bad tokenizer
            raise LlavaError(f"cannot load the tokenizer in {path} ({type(e).__name__}: {e})") from None
        pre = path / "preprocessor_config.json"
        pre = json.loads(pre.read_text()) if pre.exists() else {}
        image_config = ImageConfig.from_preprocessor_config(pre, config.get("image_aspect_ratio"))
        vision = config.get("vision_config") or {}
        patches = (vision.get("image_size", 336) // vision.get("patch_size", 14)) ** 2
        strategy = config.get("vision_feature_select_strategy", "default")
        conv_mode = config.get("conv_mode") or (
            conversation.CHAT_TEMPLATE if tokenizer.chat_template else "llava_v1"
        )
        text = config.get("text_config", {})
        return cls(
            tokenizer,
            image_config,
            config.get("image_token_index", config.get("image_token_id", 32000)),
            patches if strategy == "default" else patches + 1,
            conv_mode,
            text.get("max_position_embeddings") or 4096,
            IM_START_END if config.get("mm_use_im_start_end") else None,
        )

    def prompt(self, messages, add_generation_prompt: bool = True, conv_mode: Optional[str] = None) -> str:
        """Messages ({"role", "content"}, `<image>` where an image goes) -> prompt text."""
        return conversation.render(
            messages, conv_mode or self.conv_mode, self.tokenizer,
            add_generation_prompt=add_generation_prompt,
        )

    def encode(self, prompt: str) -> list:
        """Token ids as the original LLaVA makes them, `<image>` expanded to visual tokens."""
        if self.image_wrap:
            before, after = self.image_wrap
            placeholder = conversation.IMAGE_PLACEHOLDER
            prompt = prompt.replace(placeholder, before + placeholder + after)
        return conversation.tokenize(
            self.tokenizer, prompt, self.image_token_index, self.num_visual_tokens
        )

    def preprocess(self, images) -> mx.array:
        return mx.array(preprocess(images, self.image_config))

    def __call__(self, prompt: str, images=None) -> dict:
        """llava-hf style inputs: {"input_ids": (1, L), "pixel_values": (N, H, W, 3) or None}."""
        images = [] if images is None else images if isinstance(images, (list, tuple)) else [images]
        n = prompt.count(conversation.IMAGE_PLACEHOLDER)
        if n != len(images):
            raise LlavaError(
                f"the prompt has {n} {conversation.IMAGE_PLACEHOLDER} placeholder(s) "
                f"but {len(images)} image(s) were given"
            )
        return {
            "input_ids": mx.array([self.encode(prompt)]),
            "pixel_values": self.preprocess(images) if images else None,
        }

    def decode(self, tokens) -> str:
        return self.tokenizer.decode(list(tokens))

    def save(self, path):
        """Tokenizer files and preprocessor_config.json, as llava-hf lays them out."""
        path = Path(path)
        self.tokenizer.save_pretrained(str(path))
        (path / "preprocessor_config.json").write_text(
            json.dumps(self.image_config.to_preprocessor_config(), indent=2)
        )

