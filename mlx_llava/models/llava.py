"""LLaVA: vision tower -> projector -> visual tokens spliced into the language model.

The language model is mlx-lm's, chosen by `text_config.model_type` through
mlx-lm's own registry. Parameter names follow llava-hf / mlx-vlm:
`vision_tower.vision_model.*`, `multi_modal_projector.*`,
`language_model.model.*`, `language_model.lm_head.*`, and LLaVA-1.6's
`image_newline`.

LLaVA-1.6 (`image_aspect_ratio: "anyres"`, llava-hf's `llava_next`): each
image is several crops, encoded in one batch; their projected features are
laid out by the gather `anyres.py` describes (base image, then the grid
unpadded, a newline after each row), so each image gives its own number of
visual tokens.
"""

import importlib
from dataclasses import dataclass, field
from typing import List, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs
from mlx_lm.utils import MODEL_ARCHITECTURE_REMAPPING, MODEL_REMAPPING

from .. import anyres as anyres_rules
from ..errors import LlavaError
from .clip import VisionConfig, VisionTower, vision_config_with_defaults
from .projector import Projector

# transformers' defaults for the fields a sparse llava-hf `text_config` leaves
# out; transformers fills these in silently, so must we.
TEXT_DEFAULTS = {
    "llama": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, rms_norm_eps=1e-6, vocab_size=32000,
        max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=False,
    ),
    "mistral": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-6,
        vocab_size=32000, max_position_embeddings=4096 * 32, rope_theta=10000.0,
        sliding_window=4096, tie_word_embeddings=False,
    ),
    "qwen2": dict(
        hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-6,
        vocab_size=151936, max_position_embeddings=32768, rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
}

# LlavaConfig's vision tower when a config names none: CLIP ViT-L/14-336.
LLAVA_VISION = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
    num_attention_heads=16, image_size=336, patch_size=14,
)


def text_config_with_defaults(text_config: dict) -> dict:
    """A complete text config for mlx-lm from a llava-hf (or language model's)
    one, sparse or full, in transformers 4's spelling or 5's.

    Every value the file has wins; the architecture's transformers defaults
    fill only what it leaves out. Idempotent."""
    config = dict(text_config)
    model_type = config.get("model_type") or "llama"
    config = {**TEXT_DEFAULTS.get(model_type, {}), **config, "model_type": model_type}
    return {**config, **rope_fields(config)}


def rope_fields(config: dict) -> dict:
    """`rope_theta` and `rope_scaling` as mlx-lm reads them (transformers 4's
    spelling) from either spelling, with transformers' precedence: the
    scaling dict (`rope_scaling`, else 5's `rope_parameters`) and the theta
    inside it win over a top-level `rope_theta`, which wins over the default."""
    params = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    out = {}
    theta = params.get("rope_theta", config.get("rope_theta"))
    if theta is not None:  # else the architecture's own default, in mlx-lm
        out["rope_theta"] = theta
    rope_type = params.pop("type", None)  # transformers 4's older key; rope_type wins
    rope_type = params.get("rope_type") or rope_type or "default"
    if rope_type == "default":
        out["rope_scaling"] = None
        return out
    scaling = {**params, "rope_type": rope_type}
    if rope_type in ("llama3", "yarn", "longrope") and config.get("max_position_embeddings"):
        # transformers 5 assumes the model was pretrained at its full length.
        scaling.setdefault("original_max_position_embeddings", config["max_position_embeddings"])
    out["rope_scaling"] = scaling
    return out


def llava_config(config: dict) -> dict:
    """A LLaVA config.json in any spelling we read -> the one our model is
    built from: complete text and vision configs (values in the file win,
    defaults fill the rest) and the image token as `image_token_index`
    (transformers 5 may write `image_token_id`). Idempotent."""
    config = dict(config)
    if "image_token_id" in config:
        token_id = config.pop("image_token_id")
        index = config.setdefault("image_token_index", token_id)
        if index != token_id:
            raise LlavaError(
                f"config.json gives two image tokens: image_token_index {index} and image_token_id {token_id}"
            )
    config["text_config"] = text_config_with_defaults(config.get("text_config") or {})
    vision = config.get("vision_config") or {"model_type": "clip_vision_model", **LLAVA_VISION}
    config["vision_config"] = vision_config_with_defaults(vision)
    if config.get("model_type") == "llava_next":
        # llava-hf's LLaVA-1.6: AnyRes with spatial_unpad, transformers' rules.
        config.setdefault("image_aspect_ratio", "anyres")
    return config


@dataclass
class ModelArgs(BaseModelArgs):
    text_config: dict = field(default_factory=dict)
    vision_config: Optional[dict] = None
    model_type: str = "llava"
    image_token_index: int = 32000
    vision_feature_layer: Union[int, List[int]] = -2
    vision_feature_select_strategy: str = "default"
    projector_type: str = "mlp2x_gelu"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    # LLaVA-1.6 (anyres): see anyres.py
    image_aspect_ratio: Optional[str] = None
    image_grid_pinpoints: Optional[Union[list, str]] = None  # (height, width) pairs
    mm_patch_merge_type: Optional[str] = None
    unpad_rounding: Optional[str] = None  # "round" (transformers) or "truncate" (the original)

    def __post_init__(self):
        complete = llava_config({"text_config": self.text_config, "vision_config": self.vision_config})
        self.text_config, self.vision_config = complete["text_config"], complete["vision_config"]

    @classmethod
    def from_dict(cls, params):
        return super().from_dict(llava_config(params))

    @property
    def feature_layers(self) -> List[int]:
        layer = self.vision_feature_layer
        return [layer] if isinstance(layer, int) else list(layer)

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens one image (or one AnyRes crop) becomes (576 for CLIP ViT-L/14 at 336 px)."""
        n = VisionConfig.from_dict(self.vision_config).num_patches
        return n if self.vision_feature_select_strategy == "default" else n + 1

    @property
    def anyres(self) -> Optional[anyres_rules.AnyRes]:
        """LLaVA-1.6's settings, or None for a model that sees each image once."""
        rules = anyres_rules.from_config(
            {"image_aspect_ratio": self.image_aspect_ratio, "image_grid_pinpoints": self.image_grid_pinpoints,
             "mm_patch_merge_type": self.mm_patch_merge_type, "unpad_rounding": self.unpad_rounding},
            self.vision_config)
        if rules is not None and self.vision_feature_select_strategy != "default":
            raise LlavaError("anyres lays out patch features only: vision_feature_select_strategy must be 'default'")
        return rules


def language_model_classes(text_config: dict):
    """(Model, ModelArgs) of mlx-lm's module for the text config's model type,
    through mlx-lm's own registry (its remappings, then `mlx_lm.models.<type>`)."""
    model_type = text_config.get("model_type")
    model_type = MODEL_REMAPPING.get(model_type, model_type)
    for architecture in text_config.get("architectures") or ():
        model_type = MODEL_ARCHITECTURE_REMAPPING.get((text_config.get("model_type"), architecture), model_type)
    try:
        module = importlib.import_module(f"mlx_lm.models.{model_type}")
    except ImportError:
        raise LlavaError(
            f"unknown language model architecture {text_config.get('model_type')!r} "
            "(mlx-lm has no model of that type)"
        ) from None
    return module.Model, module.ModelArgs


def merge_visual_tokens(embeds, input_ids, features, image_token_index, check: bool = True):
    """Put visual tokens where the image token stands, in reading order over
    the batch: image k fills the k-th run of image tokens. `features` are
    (images, tokens, D), or each image's (tokens, D) in a list or
    concatenated (images of different token counts, as with AnyRes).
    `check` compares the counts first (a host sync; a compiled training step
    has checked its data already and passes False)."""
    is_image = input_ids == image_token_index
    images = "the image(s)"
    if isinstance(features, (list, tuple)):
        images = f"{len(features)} image(s)"
        features = mx.concatenate([f.reshape(-1, f.shape[-1]) for f in features]) if features else None
    if features is None:
        images = "0 image(s)"
    dims = features.shape[-1] if features is not None else 0
    n_visual = features.size // dims if features is not None and dims else 0
    if check:
        n_tokens = is_image.sum().item()
        if n_tokens != n_visual:
            per_image = ""
            if features is not None and features.ndim == 3:
                images, per_image = f"{features.shape[0]} image(s)", f" ({features.shape[1]} per image)"
            raise LlavaError(
                f"the prompt has {n_tokens} image tokens but {images} give {n_visual} visual tokens{per_image}"
            )
    if n_visual == 0:
        return embeds
    flat = features.reshape(-1, dims).astype(embeds.dtype)
    index = mx.maximum(mx.cumsum(is_image.reshape(-1).astype(mx.int32)) - 1, 0)
    placed = flat[index].reshape(embeds.shape)
    return mx.where(is_image[..., None], placed, embeds)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        vision = VisionConfig.from_dict(args.vision_config)
        if vision.model_type not in ("clip_vision_model", "clip"):
            raise LlavaError(f"unsupported vision tower {vision.model_type!r} (CLIP only)")
        model_class, args_class = language_model_classes(args.text_config)
        text = args_class.from_dict(args.text_config)
        self.anyres = args.anyres
        if self.anyres is not None and self.anyres.newline:
            self.image_newline = mx.zeros((args.text_config["hidden_size"],))
        self.vision_tower = VisionTower(vision)
        try:
            self.language_model = model_class(text)
            self.multi_modal_projector = Projector(
                args.projector_type,
                vision.hidden_size * len(args.feature_layers),
                args.text_config["hidden_size"],
                bias=args.multimodal_projector_bias,
                hidden_act=args.projector_hidden_act,
            )
        except ValueError as e:  # an unknown rope type, projector or activation in config.json
            raise LlavaError(f"cannot build this LLaVA: {e}") from None

    @property
    def num_visual_tokens(self) -> int:
        return self.args.num_visual_tokens

    def vision_features(self, pixel_values: mx.array) -> mx.array:
        """(N, H, W, 3) pixels -> (N, T, C) the vision tower's selected features,
        before the projector (what stage-1 training can cache)."""
        dtype = self.vision_tower.vision_model.embeddings.patch_embedding.weight.dtype
        states = self.vision_tower(pixel_values.astype(dtype), self.args.feature_layers)
        if self.args.vision_feature_select_strategy == "default":
            states = [s[:, 1:] for s in states]
        elif self.args.vision_feature_select_strategy != "full":
            raise LlavaError(
                f"unknown vision_feature_select_strategy {self.args.vision_feature_select_strategy!r}"
            )
        return mx.concatenate(states, axis=-1)

    def encode_images(self, pixel_values: mx.array, image_sizes=None) -> mx.array:
        """(N, H, W, 3) pixels -> (N, T, D) visual tokens in the language model's
        space. AnyRes: the crops of images of `image_sizes` ((height, width)
        each), one image's after another, -> their visual tokens, (total, D)."""
        projected = self.multi_modal_projector(self.vision_features(pixel_values))
        if self.anyres is None:
            return projected
        if image_sizes is None:
            raise LlavaError("an anyres model needs each image's size (image_sizes) to lay out its crops")
        sizes = [tuple(int(x) for x in s) for s in (image_sizes.tolist() if hasattr(image_sizes, "tolist") else image_sizes)]
        crops = sum(self.anyres.crops(s) for s in sizes)
        if crops != projected.shape[0]:
            raise LlavaError(f"{len(sizes)} image(s) of sizes {sizes} have {crops} crops, but {projected.shape[0]} were given")
        return self.lay_out(projected, mx.array(self.anyres.batch_index(sizes)))

    def lay_out(self, projected: mx.array, index: mx.array) -> mx.array:
        """AnyRes: the crops' projected features (crops, T, D) -> visual tokens
        (len(index), D) by `anyres.token_index`'s gather; NEWLINE rows take
        `image_newline`."""
        table = projected.reshape(-1, projected.shape[-1])
        if "image_newline" in self:
            table = mx.concatenate([table, self.image_newline[None].astype(table.dtype)])
        return table[mx.where(index < 0, table.shape[0] - 1, index)]

    def embed(self, input_ids, pixel_values=None, image_features=None, check: bool = True,
              image_sizes=None) -> mx.array:
        """Word embeddings with each image's visual tokens spliced in."""
        is_image = input_ids == self.args.image_token_index
        # The image token may lie outside the vocabulary (original checkpoints).
        embeds = self.language_model.model.embed_tokens(mx.where(is_image, 0, input_ids))
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values, image_sizes)
        return merge_visual_tokens(embeds, input_ids, image_features, self.args.image_token_index, check)

    def __call__(self, input_ids: mx.array, pixel_values: Optional[mx.array] = None, cache=None,
                 image_sizes=None):
        embeds = self.embed(input_ids, pixel_values, image_sizes=image_sizes)
        return self.language_model(input_ids, cache=cache, input_embeddings=embeds)

    def sanitize(self, weights: dict) -> dict:
        """Every published spelling of LLaVA's weight names -> ours."""
        renamed = {}
        for k, v in weights.items():
            renamed[rename(k)] = v
        vision = {k: v for k, v in renamed.items() if k.startswith("vision_tower.")}
        lm = {
            k[len("language_model."):]: v
            for k, v in renamed.items()
            if k.startswith("language_model.")
        }
        rest = {k: v for k, v in renamed.items() if not k.startswith(("vision_tower.", "language_model."))}
        vision = self.vision_tower.sanitize(vision, self.vision_tower.config.num_channels)
        lm = self.language_model.sanitize(lm)
        return {**vision, **rest, **{f"language_model.{k}": v for k, v in lm.items()}}

    @property
    def layers(self):
        return self.language_model.layers


def rename(key: str) -> str:
    """One weight name, as llava-hf (transformers 4 or 5) or mlx-vlm wrote it, in our layout."""
    if key == "model.image_newline":
        return "image_newline"
    if key.startswith("model.language_model."):
        return "language_model.model." + key[len("model.language_model."):]
    if key.startswith("lm_head."):
        return "language_model." + key
    if key.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
        key = key[len("model."):]
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        key = "vision_tower.vision_model." + key[len("vision_tower."):]
    return key
