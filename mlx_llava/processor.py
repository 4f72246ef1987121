"""The processor: prompt text + images -> model inputs, and back to text.

It pairs the model's tokenizer (mlx-lm's wrapper, for streaming
detokenization) with the image preprocessing and the conversation template,
so that `processor(prompt, images)` gives llava-hf style inputs: each
`<image>` expanded to the visual tokens it becomes. For LLaVA-1.6 (AnyRes)
that number depends on the image's size, so `encode` takes the sizes.

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
from .image import ImageConfig, preprocess_with_sizes
from .models.llava import ModelArgs

IM_START_END = ("<im_start>", "<im_end>")  # the original's DEFAULT_IM_START_TOKEN / DEFAULT_IM_END_TOKEN


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "tokenizer.tiktoken")
TOO_LONG = "sequence-length-is-longer-than-the-specified-maximum"


def read_tokenizer(path: Path, eos_token_ids=None):
    """mlx-lm's tokenizer wrapper; a missing or broken tokenizer is one line."""
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise LlavaError(f"{path} has no tokenizer (no tokenizer.json or tokenizer.model)")
    try:
        tokenizer = load_tokenizer(path, eos_token_ids=eos_token_ids)
    except Exception as e:  # transformers raises many kinds, with many lines, for a bad tokenizer
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        raise LlavaError(f"cannot load the tokenizer in {path} ({type(e).__name__}: {first})") from None
    # A prompt past the context is refused with our own message; transformers'
    # warning about model_max_length would come first.
    warned = getattr(tokenizer._tokenizer, "deprecation_warnings", None)
    if isinstance(warned, dict):
        warned[TOO_LONG] = True
    return tokenizer


def read_image_config(path: Path, image_size: int, image_aspect_ratio=None, grid_pinpoints=None) -> ImageConfig:
    """preprocessor_config.json, checked against the vision tower's input size.

    Without the file, CLIP's preprocessing at the vision tower's own
    image_size; a file that is not JSON, has a field of the wrong type or
    makes images of another size than the tower takes is refused in one line
    naming the file and the field."""
    file = path / "preprocessor_config.json"
    if not file.exists():
        return ImageConfig.from_preprocessor_config(
            {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size}},
            image_aspect_ratio, grid_pinpoints)
    try:
        pre = json.loads(file.read_text())
    except (ValueError, OSError) as e:
        raise LlavaError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(pre, dict):
        raise LlavaError(f"{file} must hold a JSON object")
    for key, kinds in (("size", (int, dict)), ("crop_size", (int, dict)), ("image_mean", (list,)),
                       ("image_std", (list,)), ("rescale_factor", (int, float)), ("resample", (int,))):
        if pre.get(key) is not None and not isinstance(pre[key], kinds):
            raise LlavaError(f"{file}: {key} has the wrong type ({pre[key]!r})")
    for key in ("image_mean", "image_std"):
        value = pre.get(key)
        if value is not None and not (len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
            raise LlavaError(f"{file}: {key} must be 3 numbers, not {value!r}")
    try:
        image_config = ImageConfig.from_preprocessor_config(pre, image_aspect_ratio, grid_pinpoints)
    except (KeyError, TypeError, ValueError) as e:
        raise LlavaError(f"{file}: unreadable ({type(e).__name__}: {e})") from None
    side = image_config.crop_size if image_config.do_center_crop else image_config.resize_size
    if side is not None and tuple(side) != (image_size, image_size):
        field = "crop_size" if image_config.do_center_crop else "size"
        raise LlavaError(f"{file}: {field} {side[0]}x{side[1]} does not match the vision tower's "
                         f"image_size {image_size} (config.json)")
    return image_config


class Processor:
    def __init__(self, tokenizer, image_config: ImageConfig, image_token_index: int,
                 num_visual_tokens: int, conv_mode: str, context_length: int,
                 image_wrap: Optional[tuple] = None, legacy: bool = True, anyres=None):
        self.tokenizer = tokenizer  # mlx-lm's wrapper: decoding, streaming, EOS ids
        # Prompt and target ids as the original's tokenizer makes them.
        self.encoder = conversation.OriginalTokenizer(tokenizer, legacy)
        self.image_wrap = image_wrap  # (before, after) each <image>, e.g. ("<im_start>", "<im_end>")
        self.image_config = image_config
        self.image_token_index = image_token_index
        self.num_visual_tokens = num_visual_tokens  # per image; per crop with AnyRes
        self.anyres = anyres  # LLaVA-1.6's geometry (anyres.AnyRes), or None
        self.conv_mode = conv_mode
        self.context_length = context_length

    @classmethod
    def from_dir(cls, path, config: dict):
        path = Path(path)
        tokenizer = read_tokenizer(path, config.get("text_config", {}).get("eos_token_id"))
        attach_chat_template(tokenizer, path)
        args = ModelArgs.from_dict(config)
        anyres = args.anyres
        try:
            pre = json.loads((path / "preprocessor_config.json").read_text())
        except (OSError, ValueError):
            pre = {}  # none, or broken: read_image_config says which
        chosen = settings(config, pre if isinstance(pre, dict) else {}, has_chat_template(tokenizer))
        image_config = read_image_config(path, args.vision_config["image_size"], chosen["image_aspect_ratio"],
                                         anyres.pinpoints if anyres else None)
        return cls(
            tokenizer,
            image_config,
            args.image_token_index,
            args.num_visual_tokens,
            chosen["conv_mode"],
            args.text_config.get("max_position_embeddings") or 4096,
            IM_START_END if config.get("mm_use_im_start_end") else None,
            legacy=tokenizer_legacy(path),
            anyres=anyres,
        )

    @property
    def train_conv_mode(self) -> str:
        """The template this model's instruction tuning used (stage 2 and the benchmarks)."""
        return conversation.trained_conv_mode(self.conv_mode)

    def prompt(self, messages, add_generation_prompt: bool = True, conv_mode: Optional[str] = None) -> str:
        """Messages ({"role", "content"}, `<image>` where an image goes) -> prompt text."""
        return conversation.render(
            messages, conv_mode or self.conv_mode, self.tokenizer,
            add_generation_prompt=add_generation_prompt,
        )

    def visual_tokens(self, image_size=None) -> int:
        """Visual tokens an image of `image_size` (height, width) becomes; the
        size matters only with AnyRes."""
        if self.anyres is None:
            return self.num_visual_tokens
        if image_size is None:
            raise LlavaError("an anyres model's visual token count depends on the image: give its size")
        return self.anyres.num_tokens(tuple(image_size))

    def encode(self, prompt: str, image_sizes=None) -> list:
        """Token ids as the original LLaVA makes them, `<image>` expanded to
        visual tokens: the k-th to the count of the k-th image's size
        (height, width) with AnyRes, else to `num_visual_tokens` each."""
        placeholder = conversation.IMAGE_PLACEHOLDER
        counts = self.num_visual_tokens
        if self.anyres is not None and placeholder in prompt:
            n = prompt.count(placeholder)
            if image_sizes is None or len(image_sizes) != n:
                raise LlavaError(f"the prompt has {n} {placeholder} placeholder(s) but "
                                 f"{0 if image_sizes is None else len(image_sizes)} image size(s) were given")
            counts = [self.visual_tokens(size) for size in image_sizes]
        if self.image_wrap:
            before, after = self.image_wrap
            prompt = prompt.replace(placeholder, before + placeholder + after)
        return conversation.tokenize(self.encoder, prompt, self.image_token_index, counts)

    def preprocess(self, images) -> mx.array:
        """Pixel values (N, H, W, 3); with AnyRes, each image's crops in turn."""
        return self.image_inputs(images)[0]

    def image_inputs(self, images) -> tuple:
        """-> (pixel values as `preprocess` gives them, [(height, width)] of the images)."""
        pixels, sizes = preprocess_with_sizes(images, self.image_config)
        return mx.array(pixels), sizes

    def __call__(self, prompt: str, images=None) -> dict:
        """llava-hf style inputs: {"input_ids": (1, L), "pixel_values": (N, H, W, 3)
        or None, "image_sizes": [(height, width)] or None}. With AnyRes the
        pixel values are every image's crops, one image after another."""
        images = [] if images is None else images if isinstance(images, (list, tuple)) else [images]
        n = prompt.count(conversation.IMAGE_PLACEHOLDER)
        if n != len(images):
            raise LlavaError(
                f"the prompt has {n} {conversation.IMAGE_PLACEHOLDER} placeholder(s) "
                f"but {len(images)} image(s) were given"
            )
        pixels, sizes = self.image_inputs(images) if images else (None, None)
        return {"input_ids": mx.array([self.encode(prompt, sizes)]), "pixel_values": pixels, "image_sizes": sizes}

    def decode(self, tokens) -> str:
        return self.tokenizer.decode(list(tokens))

    def save(self, path):
        """Tokenizer files and preprocessor_config.json, as llava-hf lays them out."""
        path = Path(path)
        self.tokenizer.save_pretrained(str(path))
        if self.encoder.slow_legacy is not None:
            write_legacy(path, self.encoder.slow_legacy)
        (path / "preprocessor_config.json").write_text(
            json.dumps(self.image_config.to_preprocessor_config(), indent=2)
        )


# ---------------------------------------------------------------- choices


def settings(config: dict, preprocessor: Optional[dict], chat_template: bool,
             original_name: Optional[str] = None) -> dict:
    """A model's chat template and image handling: {"conv_mode", "image_aspect_ratio", "why"}.

    The one rule, for `load` and `convert` alike. A value the config already
    holds wins (a converted folder, or `--conv-mode`). Otherwise an original
    LLaVA checkpoint (`original_name`, the name its template is chosen by)
    gets the template the original's CLI picks from that name; any other
    model its tokenizer's own chat template when it has one (xtuner's
    llava-llama-3, llava-phi-3: a prompt format of their own), else llava_v1.
    Images are handled as the config says ("pad", "crop"/"square", LLaVA-1.6's
    "anyres"); a llava-hf `llava_next` model is anyres; else images are
    padded to squares where the preprocessor does (`do_pad`), else for
    LLaVA-1.5-shaped models (CLIP at 336 px + the MLP projector: LLaVA-1.5
    and the models trained with its recipe all pad); anything else is
    center-cropped as CLIP does.
    """
    pre = preprocessor or {}
    conv_mode, why = config.get("conv_mode"), "from config.json"
    if not conv_mode and original_name is not None:
        conv_mode = conversation.conv_mode_from_name(original_name)
        why = f"the original LLaVA's choice for a model named {original_name!r}"
    elif not conv_mode:
        conv_mode, why = ((conversation.CHAT_TEMPLATE, "the tokenizer's own chat template") if chat_template
                          else (conversation.DEFAULT_CONV_MODE, "no chat template in the tokenizer"))
    aspect = config.get("image_aspect_ratio")
    if aspect in ("square", ""):
        aspect = "crop"
    if aspect is None and config.get("model_type") == "llava_next":
        aspect = "anyres"
    if aspect is None and isinstance(pre.get("do_pad"), bool):
        aspect = "pad" if pre["do_pad"] else "crop"
    if aspect is None:
        vision = config.get("vision_config") or {}
        llava_15 = vision.get("image_size") == 336 and config.get("projector_type", "mlp2x_gelu") == "mlp2x_gelu"
        aspect = "pad" if llava_15 else "crop"
    return {"conv_mode": conv_mode, "image_aspect_ratio": aspect, "why": why}


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def attach_chat_template(tokenizer, folder):
    """llava-hf keeps the chat template beside the tokenizer (chat_template.json
    or .jinja, the processor's); give it to a tokenizer that has none."""
    folder = Path(folder)
    if has_chat_template(tokenizer):
        return
    template = None
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    elif (folder / "chat_template.json").is_file():
        template = json.loads((folder / "chat_template.json").read_text()).get("chat_template")
    if template:
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        hf.chat_template = template


def write_legacy(folder, legacy: bool):
    """Record `legacy` in a saved tokenizer_config.json: transformers 5 leaves
    it out, and without it reads a LLaMA tokenizer as non-legacy."""
    path = Path(folder) / "tokenizer_config.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**data, "legacy": legacy}, indent=2) + "\n")


def tokenizer_legacy(folder) -> bool:
    """Whether the original's slow LlamaTokenizer for this folder is `legacy`:
    as tokenizer_config.json says; else as a saved fast tokenizer's prefix
    scheme shows ("always" is legacy); else True, transformers 4's default,
    under which the original ran."""
    folder = Path(folder)
    for name in ("tokenizer_config.json", "tokenizer.json"):
        try:
            data = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if name == "tokenizer_config.json":
            if isinstance(data.get("legacy"), bool):
                return data["legacy"]
            continue
        pre = data.get("pre_tokenizer") or {}
        steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
        for step in steps:
            if step.get("type") == "Metaspace" and step.get("prepend_scheme") in ("always", "first"):
                return step["prepend_scheme"] == "always"
    return True
