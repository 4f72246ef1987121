"""Which chat template and image handling a model gets: one rule for load and convert."""

import json
import shutil

import pytest

import mlx_llava
from conftest import build_reference, save_reference
from mlx_llava.convert import convert
from mlx_llava.conversation import conv_mode_from_name, trained_conv_mode
from mlx_llava.processor import settings
from test_convert import clip_folder, write_original

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"


@pytest.mark.parametrize("name,mode", [
    ("llava-v1.5-7b", "llava_v1"),
    ("llava-v1.5-13b-lora", "llava_v1"),
    ("llava-v1-0719-336px-lora-merge-vicuna-13b-v1.3", "llava_v1"),
    ("llava-llama-2-13b-chat-lightning-preview", "llava_llama_2"),
    ("llava-v1.6-mistral-7b", "mistral_instruct"),
    ("llava-v1.6-34b", "chatml_direct"),
    ("llava-v1.6-vicuna-13b", "llava_v1"),
    ("LLaVA-Lightning-MPT-7B-preview", "mpt"),
    ("LLaVA-13b-delta-v0", "llava_v0"),
    ("my-run", "llava_v0"),
])
def test_original_template_from_the_name(name, mode):
    """llava/serve/cli.py's rule, in its order ("v1.6-34b" before "v1")."""
    assert conv_mode_from_name(name) == mode
    assert settings({}, {}, True, original_name=name)["conv_mode"] == mode  # the tokenizer's template never wins


def test_template_rule():
    assert settings({"conv_mode": "vicuna_v1"}, {}, True, "llava-v1.5-7b")["conv_mode"] == "vicuna_v1"
    assert settings({}, {}, True)["conv_mode"] == "chat_template"
    assert settings({}, {}, False)["conv_mode"] == "llava_v1"
    assert trained_conv_mode("llava_v1") == "vicuna_v1"
    for mode in ("vicuna_v1", "llava_llama_2", "mistral_instruct", "plain", "chat_template"):
        assert trained_conv_mode(mode) == mode


@pytest.mark.parametrize("config,pre,aspect", [
    ({"image_aspect_ratio": "pad"}, {"do_pad": False}, "pad"),  # the config wins
    ({"image_aspect_ratio": "square"}, {}, "crop"),
    ({}, {"do_pad": True}, "pad"),
    ({"vision_config": {"image_size": 336}}, {"do_pad": False}, "crop"),  # an explicit do_pad wins
    ({"vision_config": {"image_size": 336}}, {}, "pad"),  # LLaVA-1.5-shaped
    ({"vision_config": {"image_size": 336}, "projector_type": "linear"}, {}, "crop"),
    ({"vision_config": {"image_size": 224}}, {}, "crop"),
])
def test_image_rule(config, pre, aspect):
    assert settings(config, pre, False)["image_aspect_ratio"] == aspect


@pytest.fixture(scope="module")
def templated_mlx_vlm(tmp_path_factory, tokenizer_dir):
    """An mlx-vlm style folder whose tokenizer has its own chat template, and
    whose config names neither template nor image handling."""
    from mlx_llava.processor import Processor
    from mlx_llava.weights import load_model, save_model

    root = tmp_path_factory.mktemp("templated")
    # LLaVA-1.5-shaped (CLIP at 336 px, the MLP projector), as xtuner's llava-llama-3 and llava-phi-3 are
    hf = save_reference(build_reference(seed=4, vision={"image_size": 336, "patch_size": 14}), root / "hf",
                        tokenizer_dir)
    model, config = load_model(hf)
    processor = Processor.from_dir(hf, config)
    processor.tokenizer._tokenizer.chat_template = TEMPLATE
    config = {k: v for k, v in config.items() if k not in ("conv_mode", "image_aspect_ratio")}
    path = save_model(root / "llava-phi-tiny", model, config, processor)
    pre = json.loads((path / "preprocessor_config.json").read_text())
    pre.pop("do_pad", None)
    pre["image_processor_type"] = "CLIPImageProcessor"
    (path / "preprocessor_config.json").write_text(json.dumps(pre))
    return path


def test_load_and_convert_choose_alike(templated_mlx_vlm, tmp_path):
    """The bug: load took the tokenizer's template, convert forced llava_v1."""
    _, processor = mlx_llava.load(templated_mlx_vlm)
    assert processor.conv_mode == "chat_template"
    summary = convert(str(templated_mlx_vlm), str(tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["conv_mode"] == "chat_template"
    assert config["image_aspect_ratio"] == processor.image_config.image_aspect_ratio == "pad"
    _, converted = mlx_llava.load(tmp_path / "out")
    messages = [{"role": "user", "content": "<image>\nWhat is it?"}]
    assert converted.prompt(messages) == processor.prompt(messages) == "<|user|><image>\nWhat is it?<|assistant|>"
    assert any("template chat_template" in n for n in summary.notes)
    convert(str(templated_mlx_vlm), str(tmp_path / "forced"), conv_mode="vicuna_v1")
    assert json.loads((tmp_path / "forced" / "config.json").read_text())["conv_mode"] == "vicuna_v1"


def test_original_v0_name_gets_llava_v0(tokenizer_dir, tmp_path):
    ref = build_reference(seed=5)
    clip = clip_folder(ref, tmp_path / "clip")
    src = write_original(ref, tmp_path / "LLaVA-tiny-delta-v0-merged", tokenizer_dir, clip, kind="safetensors",
                         shards=1)
    shutil.move(src, tmp_path / "LLaVA-tiny")
    summary = convert(str(tmp_path / "LLaVA-tiny"), str(tmp_path / "out"), dtype="float32")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["conv_mode"] == "llava_v0"
    assert any("llava_v0" in n and "--conv-mode" in n for n in summary.notes)
    _, processor = mlx_llava.load(tmp_path / "out")
    assert processor.prompt([{"role": "user", "content": "<image>\nHi"}]).endswith("###Human: <image>\nHi###Assistant:")
