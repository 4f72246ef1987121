"""Config values and weight names in every spelling transformers 4 and 5 write.

A tiny LLaVA where every text and vision field our model reads has a
non-default value, saved by transformers 5 and rewritten as transformers 4
wrote it; a CLIP vision tower as CLIPVisionModel (transformers 4 and 5
names, safetensors and .bin) and as the hub's CLIPModel. Each is loaded,
converted or assembled and compared with transformers' own outputs."""

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_lm.models import llama

from conftest import PADDED_VOCAB, VOCAB, save_reference
from test_convert import hf_spellings, save_state, write_base, write_original
from mlx_llava.convert import convert
from mlx_llava.errors import LlavaError
from mlx_llava.models.llava import TEXT_DEFAULTS, llava_config, text_config_with_defaults
from mlx_llava.weights import assemble, load_model

# Every field either differs from CLIPVisionConfig's / LlamaConfig's default
# or, where that cannot show, is used in a way a default would break.
VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
    image_size=28, patch_size=7, layer_norm_eps=1e-3, hidden_act="gelu", initializer_factor=5.0,
)
TEXT = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=24, vocab_size=PADDED_VOCAB, max_position_embeddings=100,
    rms_norm_eps=1e-3, rope_theta=500000.0, attention_bias=True, mlp_bias=True,
    bos_token_id=1, eos_token_id=2, initializer_range=0.1,
)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
LINEAR = {"rope_type": "linear", "factor": 3.0}
# (rope scaling, tie_word_embeddings, vision activation, LLaVA fields)
CASES = {
    "llama3-untied": (LLAMA3, False, "gelu", dict(
        vision_feature_layer=[-2, -5], vision_feature_select_strategy="full",
        multimodal_projector_bias=False, projector_hidden_act="gelu_pytorch_tanh")),
    "linear-tied": (LINEAR, True, "gelu_new", dict(
        vision_feature_layer=-3, vision_feature_select_strategy="full",
        multimodal_projector_bias=False, projector_hidden_act="quick_gelu")),
}
N_TEXT = 40  # with 17 visual tokens: 58 positions, where rope's base shows


def build(rope=None, tie=False, vision=None, text=None, seed=0, text_type="llama", **llava):
    """A transformers LlavaForConditionalGeneration, random float32 weights,
    every norm and bias moved off its initial value."""
    from transformers import AutoConfig, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    text = {k: v for k, v in {**TEXT, **(text or {})}.items() if v is not None}  # None: leave out
    text.update(rope_scaling=rope, tie_word_embeddings=tie)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**{**VISION, **(vision or {})}),
        text_config=AutoConfig.for_model(text_type, **text),
        image_token_index=VOCAB, **llava,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def compare(ref, model, image_id=VOCAB, seed=0):
    """Largest |transformers' logits - ours| on one image and N_TEXT words."""
    rng = np.random.default_rng(seed)
    text = [int(t) for t in rng.integers(3, VOCAB, size=N_TEXT)]
    ids = [1] + text[:5] + [image_id] * model.num_visual_tokens + text[5:]
    size = ref.config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref_ids = torch.tensor([[VOCAB if i == image_id else i for i in ids]])
        expected = ref(input_ids=ref_ids, pixel_values=pixels).logits[0].numpy()
    ours = model(mx.array([ids]), mx.array(pixels.permute(0, 2, 3, 1).numpy()))
    assert len(ids) > 45
    return float(np.abs(expected - np.array(ours[0])).max())


# ---------------------------------------------------------------- the two spellings


def diff(values: dict, defaults: dict) -> dict:
    """What transformers 4 saved: only the values that differ from the defaults."""
    return {k: v for k, v in values.items() if k == "model_type" or defaults.get(k, object()) != v}


def as_transformers4(config: dict) -> dict:
    """A config.json as saved by transformers 5, as transformers 4 wrote it:
    rope_theta and rope_scaling at the top of text_config (linear in its
    older `type` key), only non-default values, `image_token_index`."""
    from transformers import CLIPVisionConfig, LlamaConfig

    config = json.loads(json.dumps(config))
    text = config["text_config"]
    rope = text.pop("rope_parameters")
    text["rope_theta"] = rope.pop("rope_theta")
    if rope["rope_type"] == "linear":
        rope["type"] = rope.pop("rope_type")
    text["rope_scaling"] = rope if rope.get("rope_type", rope.get("type")) != "default" else None
    llama_defaults = {**LlamaConfig().to_dict(), "rope_theta": 10000.0, "rope_scaling": None}
    config["text_config"] = diff(text, llama_defaults)
    config["vision_config"] = diff(config["vision_config"], CLIPVisionConfig().to_dict())
    config["image_token_index"] = config.pop("image_token_id", config.get("image_token_index"))
    return config


def as_transformers5(config: dict) -> dict:
    """transformers 5 reads (and may write) the image token as `image_token_id`."""
    config = dict(config)
    config["image_token_id"] = config.pop("image_token_index")
    return config


def write_spelling(src: Path, dst: Path, spelling: str) -> Path:
    """`src` (as transformers 5 saved it) in `spelling`: config and weight names."""
    dst = hf_spellings(src, dst, spelling)
    config = json.loads((dst / "config.json").read_text())
    rewrite = as_transformers4 if spelling == "transformers4" else as_transformers5
    (dst / "config.json").write_text(json.dumps(rewrite(config)))
    return dst


def transformers_reading(folder: Path) -> dict:
    """The fields that matter as transformers itself reads a folder's config."""
    from transformers import LlavaConfig

    c = LlavaConfig.from_pretrained(folder)
    rope = {k: v for k, v in c.text_config.rope_parameters.items() if k != "type"}
    text = {k: getattr(c.text_config, k) for k in TEXT if k != "rope_theta"}
    vision = {k: getattr(c.vision_config, k) for k in VISION}
    top = {k: getattr(c, k) for k in ("image_token_index", "vision_feature_layer", "vision_feature_select_strategy",
                                      "multimodal_projector_bias", "projector_hidden_act")}
    return {"rope": rope, "text": text, "vision": vision, "tie": c.text_config.tie_word_embeddings, **top}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tokenizer_dir, tmp_path_factory):
    """(reference, {spelling: llava-hf folder}) for one case."""
    rope, tie, act, llava = CASES[request.param]
    ref = build(dict(rope), tie, vision={"hidden_act": act}, **llava)
    root = tmp_path_factory.mktemp(request.param)
    saved = save_reference(ref, root / "saved", tokenizer_dir)
    folders = {s: write_spelling(saved, root / s, s) for s in ("transformers4", "transformers5")}
    return ref, folders


@pytest.mark.parametrize("spelling", ["transformers4", "transformers5"])
def test_every_value_in_the_file_is_used(case, spelling, tmp_path):
    ref, folders = case
    folder = folders[spelling]
    # The spelling is faithful: transformers reads it back as the reference.
    assert transformers_reading(folder) == transformers_reading(folders["transformers4"].parent / "saved")
    model, config = load_model(folder)
    assert compare(ref, model) < 1e-4
    assert config["image_token_index"] == VOCAB and "image_token_id" not in config
    assert config["text_config"]["rope_theta"] == 500000.0
    convert(str(folder), str(tmp_path / "out"), dtype="float32")
    model, config = load_model(tmp_path / "out")
    assert compare(ref, model) < 1e-4
    assert config["text_config"]["tie_word_embeddings"] is ref.config.text_config.tie_word_embeddings


def test_the_values_matter(case):
    """Each case's model differs visibly from one built with LLaMA's default
    rope (theta 10000, no scaling): the check above could fail."""
    ref, folders = case
    model, config = load_model(folders["transformers5"])
    default_rope = {**config["text_config"], "rope_theta": 10000.0, "rope_scaling": None}
    model.language_model = type(model.language_model)(llama.ModelArgs.from_dict(default_rope))
    weights = mx.load(str(folders["transformers5"] / "model.safetensors"))
    model.load_weights(list(model.sanitize(weights).items()))
    assert compare(ref, model) > 1e-3


# The other language models of mlx-lm's registry a llava-hf config may name:
# Mistral (mlx-lm's llama reads it: head_dim, no biases) and Qwen2 (q/k/v
# biases; mlx-lm's default rope_theta, 1e6, is not transformers' 1e4).
OTHER_TEXT = {
    "mistral": dict(attention_bias=None, mlp_bias=None, sliding_window=1000),
    "qwen2": dict(head_dim=None, attention_bias=None, mlp_bias=None, rope_theta=None),
}


@pytest.mark.parametrize("text_type", list(OTHER_TEXT))
def test_other_language_models(text_type, tokenizer_dir, tmp_path):
    rope = {"rope_type": "default", "rope_theta": 500000.0} if text_type == "mistral" else None
    ref = build(rope, text=OTHER_TEXT[text_type], text_type=text_type, seed=4)
    src = save_reference(ref, tmp_path / "saved", tokenizer_dir)
    saved = json.loads((src / "config.json").read_text())["text_config"]
    assert saved["model_type"] == text_type
    model, config = load_model(src)
    assert compare(ref, model) < 1e-4
    assert config["text_config"]["rope_theta"] == (500000.0 if text_type == "mistral" else 10000.0)
    convert(str(src), str(tmp_path / "out"), dtype="float32")
    model, _ = load_model(tmp_path / "out")
    assert compare(ref, model) < 1e-4


# ---------------------------------------------------------------- the normaliser


def test_sparse_text_config_gets_transformers_defaults():
    for model_type, defaults in TEXT_DEFAULTS.items():
        config = text_config_with_defaults({"model_type": model_type})
        for key, value in defaults.items():
            assert config[key] == value, (model_type, key)
        assert config.get("rope_scaling") is None
    assert text_config_with_defaults({})["model_type"] == "llama"


def test_a_present_value_is_never_replaced():
    present = dict(
        hidden_size=96, intermediate_size=160, num_hidden_layers=5, num_attention_heads=6,
        num_key_value_heads=3, head_dim=40, rms_norm_eps=1e-5, vocab_size=1234, max_position_embeddings=777,
        rope_theta=123456.0, tie_word_embeddings=True, attention_bias=True, mlp_bias=True, sliding_window=None,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    )
    for model_type in TEXT_DEFAULTS:
        config = text_config_with_defaults({**present, "model_type": model_type})
        assert {k: config[k] for k in present} == present, model_type
        assert text_config_with_defaults(config) == config  # idempotent
        args = llama.ModelArgs.from_dict(config)
        assert (args.rope_theta, args.head_dim, args.rms_norm_eps) == (123456.0, 40, 1e-5)


@pytest.mark.parametrize("rope", [
    {"rope_theta": 500000.0},
    {"rope_theta": 500000.0, "rope_type": "default"},
    {"rope_theta": 500000.0, **LINEAR},
    {"rope_theta": 8e5, "rope_type": "dynamic", "factor": 2.0},
    {"rope_theta": 500000.0, **LLAMA3},
    {"rope_theta": 500000.0, **{k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"}},
])
def test_rope_in_both_spellings_as_transformers_reads_it(rope):
    """transformers 5's `rope_parameters` and 4's top-level fields (older
    `type` key too) give mlx-lm the rope transformers itself builds."""
    from transformers import LlamaConfig

    base = {"model_type": "llama", "max_position_embeddings": 64}
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    old_key = {("type" if k == "rope_type" else k): v for k, v in scaling.items()}
    spellings = [
        {**base, "rope_parameters": rope},
        {**base, "rope_theta": rope["rope_theta"], "rope_scaling": scaling or None},
        {**base, "rope_theta": rope["rope_theta"], "rope_scaling": old_key or None},
        # a theta inside the scaling wins over a top-level one, as in transformers
        {**base, "rope_theta": 1.0, "rope_scaling": {**scaling, "rope_theta": rope["rope_theta"]}},
    ]
    expected = LlamaConfig(**spellings[0]).rope_parameters
    for spelling in spellings:
        config = text_config_with_defaults(spelling)
        assert config["rope_theta"] == expected["rope_theta"] == rope["rope_theta"]
        if expected["rope_type"] == "default":
            assert config["rope_scaling"] is None
        else:
            assert {**config["rope_scaling"], "rope_theta": expected["rope_theta"]} == expected
        assert LlamaConfig(**spelling).rope_parameters["rope_theta"] == rope["rope_theta"]


def test_image_token_either_name():
    sparse = {"text_config": {}, "vision_config": None}
    assert llava_config({**sparse, "image_token_id": 7})["image_token_index"] == 7
    assert llava_config({**sparse, "image_token_index": 7})["image_token_index"] == 7
    both = llava_config({**sparse, "image_token_index": 7, "image_token_id": 7})
    assert both["image_token_index"] == 7 and "image_token_id" not in both
    with pytest.raises(LlavaError, match="image_token_index 7 and image_token_id 8"):
        llava_config({**sparse, "image_token_index": 7, "image_token_id": 8})


def test_vision_config_defaults_and_present_values():
    """No vision config: LlavaConfig's CLIP ViT-L/14-336; a sparse one:
    CLIPVisionConfig's defaults; a present value always wins."""
    from transformers import CLIPVisionConfig, LlavaConfig

    vision = llava_config({})["vision_config"]
    assert vision == {k: getattr(LlavaConfig().vision_config, k) for k in vision}
    sparse = llava_config({"vision_config": {"model_type": "clip_vision_model", "layer_norm_eps": 1e-3}})["vision_config"]
    assert sparse == {**{k: getattr(CLIPVisionConfig(), k) for k in sparse}, "layer_norm_eps": 1e-3}


# ---------------------------------------------------------------- CLIP vision towers


@pytest.fixture(scope="module")
def clip_ref():
    """LLaVA-1.5-like (layer -2, CLS dropped) with the non-default vision and text fields."""
    return build(dict(LLAMA3), False, seed=3)


def clip_spelling(ref, folder: Path, spelling: str) -> Path:
    """The reference's vision tower as a CLIP folder in `spelling`:
    transformers5 / transformers5-bin: CLIPVisionModel.save_pretrained (no prefix);
    transformers4: `vision_model.*`; hub: CLIPModel with its text half,
    `vision_config_dict` as the openai repositories still have it."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPVisionModel

    vision = ref.config.vision_config
    state = ref.model.vision_tower.state_dict()
    if spelling == "hub":
        text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    vocab_size=50, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        clip = CLIPModel(CLIPConfig(vision_config=vision.to_dict(), text_config=text, projection_dim=8))
        clip.vision_model.load_state_dict(state)
        clip.save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        config["vision_config_dict"] = {k: v for k, v in config["vision_config"].items() if k in VISION}
        (folder / "config.json").write_text(json.dumps(config))
    else:
        tower = CLIPVisionModel(vision)
        tower.load_state_dict(state)
        tower.save_pretrained(folder)
        if spelling != "transformers5":
            from safetensors.torch import load_file

            saved = load_file(folder / "model.safetensors")
            (folder / "model.safetensors").unlink()
            prefix = "vision_model." if spelling == "transformers4" else ""
            save_state({prefix + k: v for k, v in saved.items()}, folder, "bin" if "bin" in spelling else "safetensors")
    size = vision.image_size
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(folder)
    return folder


CLIP_SPELLINGS = ["transformers5", "transformers4", "transformers5-bin", "hub"]


@pytest.mark.parametrize("spelling", CLIP_SPELLINGS)
def test_original_llava_with_each_clip_spelling(clip_ref, tokenizer_dir, tmp_path, spelling):
    """The CLIP folder named by mm_vision_tower, and by --vision-tower."""
    clip = clip_spelling(clip_ref, tmp_path / "clip-vit-tiny", spelling)
    src = write_original(clip_ref, tmp_path / "llava-v1.5-tiny", tokenizer_dir, clip, kind="safetensors")
    convert(str(src), str(tmp_path / "named"), dtype="float32")
    model, config = load_model(tmp_path / "named")
    assert compare(clip_ref, model) < 1e-4
    assert config["vision_config"]["layer_norm_eps"] == VISION["layer_norm_eps"]
    other = write_original(clip_ref, tmp_path / "llava-v1.5-other", tokenizer_dir, "openai/not-downloaded",
                           kind="safetensors")
    convert(str(other), str(tmp_path / "flag"), dtype="float32", vision_tower=str(clip))
    model, _ = load_model(tmp_path / "flag")
    assert compare(clip_ref, model) < 1e-4


@pytest.fixture(scope="module")
def language_model(clip_ref, tokenizer_dir, tmp_path_factory):
    """The reference's language model as its own folder (transformers 5's config)."""
    return write_base(clip_ref, tmp_path_factory.mktemp("lm") / "vicuna-tiny", tokenizer_dir)


@pytest.mark.parametrize("spelling", ["transformers5", "transformers4", "hub"])
def test_assemble_with_each_clip_spelling(clip_ref, language_model, tmp_path, spelling):
    """Stage 1's new LLaVA: the vision features are transformers', and with
    the reference's projector put in, so are the logits."""
    clip = clip_spelling(clip_ref, tmp_path / "clip", spelling)
    model, config, processor = assemble(language_model, clip)
    size = VISION["image_size"]
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = clip_ref.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:].numpy()
    ours = np.array(model.vision_features(mx.array(pixels.permute(0, 2, 3, 1).numpy())))
    assert np.abs(expected - ours).max() < 1e-4
    assert config["vision_config"]["hidden_act"] == "gelu" and config["text_config"]["rope_theta"] == 500000.0
    assert processor.image_config.crop_size == (size, size)
    p = clip_ref.model.multi_modal_projector
    model.multi_modal_projector.load_weights([
        (f"{name}.{leaf}", mx.array(getattr(getattr(p, name), leaf).detach().numpy()))
        for name in ("linear_1", "linear_2") for leaf in ("weight", "bias")])
    assert compare(clip_ref, model, image_id=config["image_token_index"]) < 1e-4


def test_not_a_clip_vision_tower(clip_ref, language_model, tokenizer_dir, tmp_path):
    """One LlavaError line naming the folder, from convert and from assemble."""
    clip = clip_spelling(clip_ref, tmp_path / "clip", "transformers5")
    text_only = tmp_path / "text-only"
    shutil.copytree(clip, text_only)
    (text_only / "model.safetensors").unlink()
    save_state({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 2)}, text_only, "safetensors")
    src = write_original(clip_ref, tmp_path / "llava-v1.5-tiny", tokenizer_dir, clip, kind="safetensors")
    cases = [(language_model, "is not a CLIP vision tower (model_type 'llama')"),
             (text_only, "has no CLIP vision tower weights")]
    for folder, message in cases:
        with pytest.raises(LlavaError, match=re.escape(message)) as error:
            convert(str(src), str(tmp_path / "out"), vision_tower=str(folder))
        assert str(folder) in str(error.value) and "\n" not in str(error.value)
        with pytest.raises(LlavaError, match=re.escape(message)) as error:
            assemble(language_model, folder)
        assert str(folder) in str(error.value)
    # the library reads safetensors only (.bin needs convert's unpickler)
    bin_clip = clip_spelling(clip_ref, tmp_path / "clip-bin", "transformers5-bin")
    with pytest.raises(LlavaError, match=re.escape(f"{bin_clip} has no .safetensors weights")):
        assemble(language_model, bin_clip)
