"""Shared fixtures: tiny reference checkpoints built with transformers + torch.

Everything is random weights in real layouts, float32, made on the fly; no
network. The tokenizer is a real LLaMA-style SentencePiece model (byte
fallback, dummy prefix) trained on a few sentences.
"""

import io
import json
from pathlib import Path

import pytest

CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: What is in the image? ASSISTANT: A red circle and a blue square.",
    "Describe the image briefly. There are two shapes on a white background.",
    "What color is the triangle? The triangle is green.",
    "How many objects are there? There are three objects.",
    "Where is the star? The star is at the top left of the picture.",
    "[INST] <<SYS>>\nYou are a helpful language and vision assistant.\n<</SYS>>\n\nWhat is it? [/INST]",
]

IMAGE_TOKEN = "<image>"
VOCAB = 400  # SentencePiece pieces; <image> becomes id 400
PADDED_VOCAB = 416  # llava-hf pads the embedding table past the image token


def make_tokenizer(path: Path) -> Path:
    """A LLaMA-style tokenizer (ids: <unk> 0, <s> 1, </s> 2) with <image> added."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    path = Path(path)
    sp_dir = path / "_spm"
    sp_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_writer=model,
        vocab_size=VOCAB,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        minloglevel=2,
    )
    (sp_dir / "tokenizer.model").write_bytes(model.getvalue())
    tok = LlamaTokenizer.from_pretrained(sp_dir, legacy=True, add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == VOCAB
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    image_size=28, patch_size=7, projection_dim=16, initializer_factor=5.0,
)
TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, vocab_size=PADDED_VOCAB, max_position_embeddings=256,
    bos_token_id=1, eos_token_id=2, initializer_range=0.1,
)


def build_reference(projector_type="mlp2x_gelu", kv_heads=4, feature_layer=-2,
                    strategy="default", seed=0, vision=None):
    """A transformers LlavaForConditionalGeneration with random float32 weights."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**{**VISION, **(vision or {})}),
        text_config=LlamaConfig(**{**TEXT, "num_key_value_heads": kv_heads}),
        image_token_index=VOCAB,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    if projector_type == "linear":
        # LLaVA v1's single matrix; transformers has no such projector, so swap one in.
        layers = 1 if isinstance(feature_layer, int) else len(feature_layer)

        class Linear(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.linear_1 = torch.nn.Linear(VISION["hidden_size"] * layers, TEXT["hidden_size"])

            def forward(self, x):
                return self.linear_1(x)

        model.model.multi_modal_projector = Linear()
    with torch.no_grad():  # make the norms non-trivial so a missed one shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_reference(model, path: Path, tokenizer_dir: Path, projector_type="mlp2x_gelu",
                   image_aspect_ratio="pad") -> Path:
    """Write a llava-hf style directory: weights, config, tokenizer, preprocessor."""
    import shutil

    from transformers import CLIPImageProcessorPil

    path = Path(path)
    model.save_pretrained(path)
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            shutil.copy(f, path / f.name)
    size = model.config.vision_config.image_size
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["projector_type"] = projector_type
    config["image_aspect_ratio"] = image_aspect_ratio
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture(scope="session")
def reference(tmp_path_factory, tokenizer_dir):
    """(transformers model, llava-hf directory) for the default tiny LLaVA-1.5."""
    model = build_reference()
    path = save_reference(model, tmp_path_factory.mktemp("llava"), tokenizer_dir)
    return model, path


@pytest.fixture(scope="session")
def model_dir(reference):
    return reference[1]


@pytest.fixture(scope="module")
def loaded(model_dir):
    """(model, processor) of model_dir, loaded once per test module."""
    import mlx_llava

    return mlx_llava.load(model_dir)
