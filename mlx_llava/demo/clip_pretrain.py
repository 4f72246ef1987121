"""A small CLIP trained contrastively on the world's image-caption pairs.

The vision half is mlx-llava's own CLIP vision tower; the text half is a
tiny causal transformer (mlx-lm's LLaMA blocks) read at its last token, as
CLIP's text encoder is. Only the vision tower is kept, written as a
transformers CLIPVisionModel directory, which LLaVA then uses frozen, as the
paper uses OpenAI's CLIP ViT-L/14.
"""

import json
import math
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from ..image import ImageConfig, preprocess
from ..models.clip import VisionConfig, VisionTower


class Clip(nn.Module):
    def __init__(self, vision: VisionConfig, vocab_size: int, text_dims: int, text_layers: int, dims: int):
        super().__init__()
        self.vision = VisionTower(vision)
        self.text = llama.LlamaModel(llama.ModelArgs(
            model_type="llama", hidden_size=text_dims, num_hidden_layers=text_layers,
            intermediate_size=2 * text_dims, num_attention_heads=max(1, text_dims // 32),
            rms_norm_eps=1e-5, vocab_size=vocab_size))
        self.visual_projection = nn.Linear(vision.hidden_size, dims, bias=False)
        self.text_projection = nn.Linear(text_dims, dims, bias=False)
        self.logit_scale = mx.array(math.log(1 / 0.07))
        # Region-phrase alignment, at the layer LLaVA reads (its default -2).
        self.region_layer = -2
        self.region_projection = nn.Linear(vision.hidden_size, dims, bias=False)
        self.region_scale = mx.array(math.log(1 / 0.07))

    def encode_texts(self, ids, lengths):
        hidden = self.text(ids)
        last = hidden[mx.arange(ids.shape[0]), lengths - 1]
        return self.text_projection(last)

    def __call__(self, pixels, ids, lengths, regions=None):
        """The symmetric contrastive (InfoNCE) loss of a batch of matching pairs,
        plus, with `regions`, the same loss between object tokens and phrases."""
        tokens, last = self.vision(pixels, [self.region_layer, -1])
        img = self.visual_projection(self.vision.vision_model.post_layernorm(last[:, 0]))
        loss = contrastive(img, self.encode_texts(ids, lengths), self.logit_scale, symmetric=True)
        if regions is not None:
            image, token, phrase_ids, phrase_lengths, phrase = regions
            region = self.region_projection(tokens[image, token])
            loss = loss + contrastive(region, self.encode_texts(phrase_ids, phrase_lengths),
                                      self.region_scale, target=phrase)
        return loss


def contrastive(a, b, logit_scale, target=None, symmetric=False):
    """InfoNCE between rows of `a` and rows of `b`; row i of `a` matches row
    `target[i]` of `b` (default: row i)."""
    a = a / mx.linalg.norm(a, axis=-1, keepdims=True)
    b = b / mx.linalg.norm(b, axis=-1, keepdims=True)
    logits = mx.exp(mx.minimum(logit_scale, math.log(100))) * a @ b.T
    target = mx.arange(logits.shape[0]) if target is None else target
    loss = nn.losses.cross_entropy(logits, target).mean()
    if symmetric:
        loss = (loss + nn.losses.cross_entropy(logits.T, target).mean()) / 2
    return loss


def train_clip(images, captions, tokenizer, path, image_size=64, patch_size=16, hidden_size=128,
               num_layers=4, num_heads=4, intermediate_size=256, text_dims=128, text_layers=2,
               dims=128, steps=400, batch_size=64, lr=1e-3, seed=0, regions=None, position_scale=1.0, log=print) -> Path:
    """`images`: paths or PIL images; `captions`: one list of captions per image.
    `regions` (optional): per image, its objects as (x, y, phrase), a point
    inside the object and its name ("red star"), from the annotations.

    A batch of whole-image captions is told apart by colours and background
    alone, so plain CLIP training at this scale never learns shapes, and the
    patch tokens LLaVA reads keep little of them. With `regions`, the token
    of the patch holding each object is also matched to its phrase against
    every other phrase (as region-word alignment does in RegionCLIP and
    GLIP), which makes each visual token say what stands in its patch.
    Writes the vision tower as a transformers CLIPVisionModel directory at `path`."""
    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    vision = VisionConfig(hidden_size=hidden_size, intermediate_size=intermediate_size,
                          num_hidden_layers=num_layers, num_attention_heads=num_heads,
                          image_size=image_size, patch_size=patch_size)
    image_config = ImageConfig(shortest_edge=image_size, crop_size=(image_size, image_size))
    pixels = preprocess(list(images), image_config)
    tokens = [[tokenizer.encode(c) + [tokenizer.eos_token_id] for c in caps] for caps in captions]
    model = Clip(vision, len(tokenizer._tokenizer), text_dims, text_layers, dims)
    # Position embeddings as loud as a patch's content (MLX's default is ~10x
    # quieter): otherwise the tokens of occupied patches lose where they are,
    # and LLaVA cannot answer "where" questions.
    embeddings = model.vision.vision_model.embeddings
    embeddings.position_embedding.weight = position_scale * mx.random.normal(embeddings.position_embedding.weight.shape)
    mx.eval(model.parameters())
    warmup = max(1, steps // 20)
    optimizer = optim.AdamW(learning_rate=optim.join_schedules(
        [optim.linear_schedule(0.0, lr, warmup), optim.cosine_decay(lr, steps - warmup, lr / 20)], [warmup]),
        weight_decay=0.05)
    loss_and_grad = nn.value_and_grad(model, lambda m, *a: m(*a))
    if regions is not None:
        grid = image_size // patch_size
        names = sorted({p for objects in regions for _, _, p in objects})
        encoded = [tokenizer.encode(p) + [tokenizer.eos_token_id] for p in names]
        phrase_lengths = mx.array([len(t) for t in encoded])
        phrase_ids = mx.array([t + [0] * (max(map(len, encoded)) - len(t)) for t in encoded])
        objects = [[(1 + min(y // patch_size, grid - 1) * grid + min(x // patch_size, grid - 1), names.index(p))
                    for x, y, p in objs] for objs in regions]

        def batch_regions(index):
            rows = [(row, token, phrase) for row, i in enumerate(index) for token, phrase in objects[i]]
            image, token, phrase = (mx.array(c) for c in zip(*rows))
            return image, token, phrase_ids, phrase_lengths, phrase
    tic = time.perf_counter()
    for step in range(steps):
        index = rng.choice(len(pixels), batch_size, replace=False)
        texts = [tokens[i][rng.integers(len(tokens[i]))] for i in index]
        lengths = np.array([len(t) for t in texts])
        ids = np.zeros((batch_size, lengths.max()), np.int32)
        for row, t in enumerate(texts):
            ids[row, : len(t)] = t
        loss, grads = loss_and_grad(model, mx.array(pixels[index]), mx.array(ids), mx.array(lengths),
                                    None if regions is None else batch_regions(index))
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)
        if step % 50 == 0 or step == steps - 1:
            log(f"  CLIP step {step + 1}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - tic:.0f}s)")
    factor = rescale_residual(model.vision, pixels[:256])
    log(f"  CLIP residual stream scaled by {factor:.3g} (unit-RMS features at layer -2)")
    save_vision_tower(model, vision, image_config, path)
    return Path(path)


def rescale_residual(tower: VisionTower, pixels, layer: int = -2) -> float:
    """Scale the tower's residual stream so the features at `layer` have RMS 1.

    A pre-LayerNorm transformer computes the same function at any scale of
    its residual stream: every block reads it through a LayerNorm. Scaling
    what writes to it (the pre-layernorm's affine, each block's output
    projections) by one factor scales every hidden state by that factor and
    changes nothing else. Contrastive training lets the stream grow (RMS ~5
    here) while LLaMA's word embeddings have RMS ~0.1; visual tokens a
    thousand times louder than words hamper both LLaVA stages, so the tower
    is saved at unit scale. Returns the factor."""
    rms = mx.sqrt(mx.mean(tower(mx.array(pixels), [layer])[0][:, 1:] ** 2)).item()
    factor = 1.0 / rms
    model = tower.vision_model
    blocks = [model.pre_layrnorm] + [m for layer_ in model.encoder.layers
                                     for m in (layer_.self_attn.out_proj, layer_.mlp.fc2)]
    for block in blocks:
        block.update({k: v * factor for k, v in block.parameters().items()})
    return factor


def save_vision_tower(model: Clip, vision: VisionConfig, image_config: ImageConfig, path):
    """A transformers CLIPVisionModelWithProjection directory (PyTorch's OIHW patch kernel)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = {f"vision_model.{k}": v for k, v in tree_flatten(model.vision.vision_model.parameters())}
    kernel = "vision_model.embeddings.patch_embedding.weight"
    weights[kernel] = weights[kernel].transpose(0, 3, 1, 2)
    weights["visual_projection.weight"] = model.visual_projection.weight
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    config = {
        "model_type": "clip_vision_model", "architectures": ["CLIPVisionModelWithProjection"],
        "hidden_size": vision.hidden_size, "intermediate_size": vision.intermediate_size,
        "num_hidden_layers": vision.num_hidden_layers, "num_attention_heads": vision.num_attention_heads,
        "image_size": vision.image_size, "patch_size": vision.patch_size, "num_channels": 3,
        "layer_norm_eps": vision.layer_norm_eps, "hidden_act": vision.hidden_act,
        "projection_dim": model.visual_projection.weight.shape[0],
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    pre = {**image_config.to_preprocessor_config(), "image_processor_type": "CLIPImageProcessor", "do_pad": False}
    (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
