"""CLIP ViT vision tower (the encoder LLaVA keeps frozen).

Weight names follow transformers' CLIPVisionModel (`vision_model.*`), so
llava-hf, mlx-vlm and original checkpoints load with light renaming. Images
are channels-last (N, H, W, 3), as MLX convolutions want.

`clip_vision_config` and `vision_model_name` read a CLIP folder in every
spelling it comes in: the hub's CLIPModel (`vision_model.*` beside
`text_model.*` and the projections, config `model_type: clip`), and
CLIPVisionModel as transformers 4 saves it (`vision_model.*`) or 5
(`embeddings.*`, `encoder.*`, ... with no prefix).
"""

import threading
from dataclasses import asdict, dataclass
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs

from ..errors import LlavaError


@dataclass
class VisionConfig(BaseModelArgs):
    # Defaults are transformers' CLIPVisionConfig's, so a sparse config reads
    # the same here as there.
    model_type: str = "clip_vision_model"
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def vision_config_with_defaults(vision: dict) -> dict:
    """A vision config with CLIPVisionConfig's defaults where it is silent
    (transformers 4 saves only what differs from them); its own values win."""
    return {**asdict(VisionConfig()), **vision}


# Keys of a CLIP folder's config.json that describe the file, not the tower.
NOT_VISION = ("architectures", "transformers_version", "dtype", "torch_dtype")


def clip_vision_config(config: dict) -> Optional[dict]:
    """The complete vision tower config in a CLIP folder's config.json: a
    CLIPVisionModel's own fields, or a CLIPModel's `vision_config` (older
    saves repeat it as `vision_config_dict`, which transformers lets win).
    None when the config is not a CLIP vision tower's."""
    if config.get("model_type") == "clip":
        config = {**(config.get("vision_config") or {}), **(config.get("vision_config_dict") or {})}
    if config.get("model_type", "clip_vision_model") != "clip_vision_model":
        return None
    own = {k: v for k, v in config.items() if not k.startswith("_") and k not in NOT_VISION}
    return vision_config_with_defaults({**own, "model_type": "clip_vision_model"})


# The vision transformer's parts, as CLIPVisionModel names them under `vision_model.`.
VISION_PARTS = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")


def vision_model_name(key: str) -> Optional[str]:
    """A CLIP checkpoint's tensor name -> ours under VisionTower
    (`vision_model.*`), or None for what is no part of it: a CLIPModel's
    text half and projections, position-id buffers."""
    key = key.removeprefix("vision_model.")
    if not key.startswith(VISION_PARTS) or key.endswith("position_ids"):
        return None
    return "vision_model." + key


# CLIP's quick_gelu, x * sigmoid(1.702 x), is exactly mlx's gelu_fast_approx;
# gelu_approx is transformers' tanh approximation (gelu_new, gelu_pytorch_tanh).
ACTIVATIONS = {
    "quick_gelu": nn.gelu_fast_approx, "gelu": nn.gelu,
    "gelu_new": nn.gelu_approx, "gelu_pytorch_tanh": nn.gelu_approx,
}


_thread = threading.local()


def cpu_streams() -> tuple:
    """Two CPU streams of this thread (MLX's streams belong to the thread that made them)."""
    if not hasattr(_thread, "streams"):
        _thread.streams = mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)
    return _thread.streams


def in_halves(f, axis: int, *arrays):
    """`f(*arrays)` computed in two halves cut along `axis`, each on its own
    CPU stream, and joined: MLX's CPU backend runs a stream's element-wise
    work (the exp of softmax and of the activation) on one core, and this is
    most of the tower's time after the matmuls. The result is the same. Each
    array is cut at its own middle (keys and values with fewer heads than
    the queries: the halves keep their grouping), so arrays of different
    sizes must all be even. On other devices (Metal, CUDA) `f` runs whole."""
    sizes = {a.shape[axis] for a in arrays}
    if mx.default_device() != mx.cpu or min(sizes) < 2 or (len(sizes) > 1 and any(n % 2 for n in sizes)):
        return f(*arrays)
    halves = []
    for stream, first in zip(cpu_streams(), (True, False)):
        cut = []
        for a in arrays:
            n = a.shape[axis]
            part = slice(0, n // 2) if first else slice(n // 2, n)
            cut.append(a[(slice(None),) * (axis % a.ndim) + (part,)])
        with mx.stream(stream):
            halves.append(f(*cut))
    return mx.concatenate(halves, axis=axis)


class Attention(nn.Module):
    def __init__(self, dims: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dims // num_heads) ** -0.5
        self.q_proj = nn.Linear(dims, dims)
        self.k_proj = nn.Linear(dims, dims)
        self.v_proj = nn.Linear(dims, dims)
        self.out_proj = nn.Linear(dims, dims)

    def __call__(self, x: mx.array) -> mx.array:
        B, L, _ = x.shape
        q, k, v = (
            p(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = in_halves(lambda *qkv: mx.fast.scaled_dot_product_attention(*qkv, scale=self.scale), 1, q, k, v)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        if config.hidden_act not in ACTIVATIONS:
            raise LlavaError(f"unsupported CLIP activation {config.hidden_act!r} ({', '.join(ACTIVATIONS)})")
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(in_halves(self.act, -1, self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        eps = config.layer_norm_eps
        self.self_attn = Attention(config.hidden_size, config.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = MLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=eps)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = [EncoderLayer(config) for _ in range(config.num_hidden_layers)]


class Embeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        d = config.hidden_size
        self.class_embedding = mx.zeros((d,))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, d, config.patch_size, stride=config.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(config.num_patches + 1, d)

    def __call__(self, pixels: mx.array) -> mx.array:
        patches = self.patch_embedding(pixels)  # (N, h, w, D)
        N, _, _, D = patches.shape
        patches = patches.reshape(N, -1, D)
        cls = mx.broadcast_to(self.class_embedding.astype(patches.dtype), (N, 1, D))
        return mx.concatenate([cls, patches], axis=1) + self.position_embedding.weight


class ClipVisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.embeddings = Embeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = Encoder(config)
        # Kept so checkpoints round-trip; LLaVA's features never pass through it.
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class VisionTower(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = ClipVisionTransformer(config)

    def __call__(self, pixels: mx.array, layers: List[int]) -> List[mx.array]:
        """Hidden states at `layers`, indexed as transformers' `hidden_states`
        (0 is the pre-layernormed embeddings, -1 the last layer's output).
        Layers past the deepest one asked for are not run."""
        n = len(self.vision_model.encoder.layers)
        wanted = [l % (n + 1) for l in layers]
        x = self.vision_model.pre_layrnorm(self.vision_model.embeddings(pixels))
        states = [x]
        for layer in self.vision_model.encoder.layers[: max(wanted)]:
            x = layer(x)
            states.append(x)
        return [states[i] for i in wanted]

    @staticmethod
    def sanitize(weights: dict, num_channels: int = 3) -> dict:
        """Drop buffers and turn PyTorch's OIHW patch kernel into MLX's OHWI."""
        out = {}
        for k, v in weights.items():
            if k.endswith("position_ids"):
                continue
            if k.endswith("patch_embedding.weight") and v.ndim == 4 and v.shape[-1] != num_channels:
                v = v.transpose(0, 2, 3, 1)
            out[k] = v
        return out
