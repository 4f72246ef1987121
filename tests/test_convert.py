"""`mlx-llava convert`: every source layout, made with transformers/torch from
one tiny reference, converted, loaded and compared with transformers' logits."""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import TEXT, VISION, VOCAB, build_reference, save_reference
from mlx_llava.convert import convert
from mlx_llava.errors import LlavaError
from mlx_llava.weights import load_model, quantize, save_model

PATCHES = (VISION["image_size"] // VISION["patch_size"]) ** 2

# ---------------------------------------------------------------- writing sources


def save_state(state: dict, folder: Path, kind: str, shards: int = 1):
    """A state dict as transformers lays it out: .bin (torch.save) or
    safetensors, in `shards` files with an index when more than one."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in state.items()}
    keys = list(state)
    ext, stem = ("bin", "pytorch_model") if kind == "bin" else ("safetensors", "model")
    groups = [keys[i::shards] for i in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"{stem}.{ext}" if shards == 1 else f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: state[k] for k in group}
        torch.save(part, folder / name) if kind == "bin" else save_file(part, folder / name)
        weight_map.update({k: name for k in group})
    if shards > 1:
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps(index))


def original_tokenizer(tokenizer_dir: Path, folder: Path):
    """The LLaMA tokenizer as the original LLaVA ships it: no <image>."""
    from transformers import LlamaTokenizer

    LlamaTokenizer.from_pretrained(tokenizer_dir / "_spm", legacy=True, add_bos_token=True).save_pretrained(folder)


def clip_folder(ref, folder: Path, kind="safetensors", full_clip=False):
    """The vision tower as its own CLIP repository (CLIPVisionModel, or a
    CLIPModel with a text half that must be ignored), keys `vision_model.*`."""
    from transformers import CLIPImageProcessorPil

    folder.mkdir(parents=True, exist_ok=True)
    state = {"vision_model." + k: v for k, v in ref.model.vision_tower.state_dict().items()}
    vision = ref.config.vision_config.to_dict()
    vision["model_type"] = "clip_vision_model"
    if full_clip:
        state["text_model.embeddings.token_embedding.weight"] = torch.randn(10, 8)
        config = {"model_type": "clip", "architectures": ["CLIPModel"], "vision_config": vision,
                  "text_config": {"hidden_size": 8}}
    else:
        config = {**vision, "architectures": ["CLIPVisionModel"]}
    save_state(state, folder, kind)
    (folder / "config.json").write_text(json.dumps(config))
    size = VISION["image_size"]
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(folder)
    return folder


def lm_state(ref) -> dict:
    """The language model under LlamaForCausalLM's names (Vicuna's layout)."""
    state = {"model." + k: v for k, v in ref.model.language_model.state_dict().items()}
    state["lm_head.weight"] = ref.lm_head.weight
    return state


def projector_state(ref, projector_type) -> dict:
    p = ref.model.multi_modal_projector
    if projector_type == "linear":
        return {"model.mm_projector.weight": p.linear_1.weight, "model.mm_projector.bias": p.linear_1.bias}
    return {f"model.mm_projector.{i}.{k}": v
            for i, layer in ((0, p.linear_1), (2, p.linear_2)) for k, v in layer.state_dict().items()}


def original_config(ref, vision_tower, projector_type="mlp2x_gelu", **mm) -> dict:
    """A liuhaotian-style flat config: LLaMA fields + the mm_* fields."""
    text = ref.config.text_config.to_dict()
    config = {k: v for k, v in text.items() if k not in ("model_type", "architectures", "dtype")}
    config.update({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
        "mm_vision_tower": str(vision_tower), "mm_hidden_size": VISION["hidden_size"],
        "mm_projector_type": projector_type, "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "image_aspect_ratio": "pad", "use_mm_proj": True,
        "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False,
    })
    config.update(mm)
    return config


def write_original(ref, folder, tokenizer_dir, vision_tower, kind="bin", shards=2, projector_type="mlp2x_gelu",
                   with_vision=False, extra=None, **mm):
    state = {**lm_state(ref), **projector_state(ref, projector_type), **(extra or {})}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(TEXT["hidden_size"] // 8)  # old buffers
    if with_vision:
        state.update({"model.vision_tower.vision_tower.vision_model." + k: v
                      for k, v in ref.model.vision_tower.state_dict().items()})
    save_state(state, folder, kind, shards)
    (folder / "config.json").write_text(json.dumps(original_config(ref, vision_tower, projector_type, **mm)))
    original_tokenizer(tokenizer_dir, folder)
    return folder


def write_base(ref, folder, tokenizer_dir, kind="safetensors"):
    """A plain LLaMA/Vicuna folder: what --model-base names."""
    save_state(lm_state(ref), folder, kind, shards=2)
    text = ref.config.text_config.to_dict()
    (folder / "config.json").write_text(json.dumps({**text, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    original_tokenizer(tokenizer_dir, folder)
    return folder


# ---------------------------------------------------------------- comparing


def logits(ref, model, n_images=1, seed=0, image_id=VOCAB, ref_image_id=VOCAB):
    """(transformers logits, ours) on one prompt with `n_images` images."""
    rng = np.random.default_rng(seed)
    per_image = model.num_visual_tokens
    text = [int(t) for t in rng.integers(3, VOCAB, size=10)]
    ids = [1] + text[:4] + [image_id] * per_image * n_images + text[4:]
    pixels = torch.randn(n_images, 3, VISION["image_size"], VISION["image_size"],
                         generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([[ref_image_id if i == image_id else i for i in ids]]),
                       pixel_values=pixels if n_images else None).logits[0].numpy()
    ours = model(mx.array([ids]), mx.array(pixels.permute(0, 2, 3, 1).numpy()) if n_images else None)
    return expected, np.array(ours[0].astype(mx.float32))


def max_error(ref, model, **kw):
    expected, ours = logits(ref, model, **kw)
    return np.abs(expected - ours).max()


def cosine(ref, model, **kw):
    expected, ours = logits(ref, model, **kw)
    a, b = expected.reshape(-1), ours.reshape(-1)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def run_cli(*args, env=None):
    """`mlx-llava convert *args` in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "mlx_llava.cli", "convert", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture
def cli(monkeypatch, capsys):
    """`mlx-llava convert *args` through the same `main()` the console script
    calls (its LlavaError -> one line boundary), in this process: a fresh
    interpreter costs seconds per call on a small machine. Returns a
    CompletedProcess-like result; an exception main() lets through fails the test."""
    from mlx_llava.cli import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["mlx-llava", "convert", *map(str, args)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit:
            main()
        out, err = capsys.readouterr()
        code = exit.value.code if isinstance(exit.value.code, int) else (0 if exit.value.code is None else 1)
        return subprocess.CompletedProcess(args, code, out, err)

    return run


def assert_one_line_error(result, pattern):
    assert result.returncode == 1, result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert pattern in lines[0], lines[0]


def assert_nothing_left(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ref():
    return build_reference(seed=1)


@pytest.fixture(scope="module")
def linear_ref():
    """LLaVA v1: one linear projector."""
    return build_reference(projector_type="linear", seed=2)


@pytest.fixture(scope="module")
def clip(ref, tmp_path_factory):
    return clip_folder(ref, tmp_path_factory.mktemp("clip") / "clip-vit-tiny")


# ---------------------------------------------------------------- 1. original


@pytest.mark.parametrize("kind", ["bin", "safetensors"])
def test_original_checkpoint(ref, clip, tokenizer_dir, tmp_path, kind):
    src = write_original(ref, tmp_path / "llava-v1.5-tiny", tokenizer_dir, clip, kind=kind)
    summary = convert(str(src), str(tmp_path / "out"), dtype="float32")
    assert summary.kind == "original"
    model, config = load_model(tmp_path / "out")
    assert max_error(ref, model) < 1e-4
    assert max_error(ref, model, n_images=0) < 1e-4
    assert config["conv_mode"] == "llava_v1" and config["image_aspect_ratio"] == "pad"
    assert config["image_token_index"] == VOCAB  # <image> registered after the 400 pieces
    assert config["text_config"]["tie_word_embeddings"] is False
    assert json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())["do_pad"] is True
    assert "llava-v1.5-tiny" in (tmp_path / "out" / "README.md").read_text()


def test_original_with_vision_weights_inside_and_a_clip_model_bin(ref, tokenizer_dir, tmp_path):
    """The checkpoint's own vision tower wins; only the CLIP config is read."""
    other = build_reference(seed=9)  # a different CLIP: its weights must not be used
    clip = clip_folder(other, tmp_path / "clip", kind="bin", full_clip=True)
    src = write_original(ref, tmp_path / "llava-v1.5-7b", tokenizer_dir, clip, with_vision=True)
    convert(str(src), str(tmp_path / "out"), dtype="float32")
    model, _ = load_model(tmp_path / "out")
    assert max_error(ref, model) < 1e-4


def test_original_v1_linear_with_im_start_end(linear_ref, tokenizer_dir, tmp_path):
    """LLaVA v1 (0719): linear projector, <im_start><image><im_end> prompts,
    select layer -2, CLIP from --vision-tower overriding the config's."""
    import mlx_llava

    clip = clip_folder(linear_ref, tmp_path / "clip-v1")
    src = write_original(linear_ref, tmp_path / "llava-v1-0719-336px-lora-merge-vicuna-13b-v1.3", tokenizer_dir,
                         "openai/not-downloaded", projector_type="linear", kind="safetensors",
                         mm_use_im_start_end=True, mm_use_im_patch_token=True, image_aspect_ratio="square")
    convert(str(src), str(tmp_path / "out"), dtype="float32", vision_tower=str(clip))
    model, config = load_model(tmp_path / "out")
    # <im_patch> 400, <im_start> 401, <im_end> 402 (the original's order), <image> 403
    assert config["image_token_index"] == 403 and config["mm_use_im_start_end"] is True
    assert config["projector_type"] == "linear" and config["image_aspect_ratio"] == "crop"
    assert max_error(linear_ref, model, image_id=403) < 1e-4
    _, processor = mlx_llava.load(tmp_path / "out")
    ids = processor.encode(processor.prompt([{"role": "user", "content": "<image>\nWhat is it?"}]))
    start = ids.index(403)
    assert ids[start - 1] == 401 and ids[start + PATCHES] == 402 and ids.count(403) == PATCHES
    # training targets wrap the image the same way (the original's preprocess_multimodal)
    from mlx_llava.conversation import IGNORE_INDEX, build_targets

    turns = [{"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A cat."}]
    ids, labels = build_targets(processor.encoder, turns, processor.train_conv_mode, 403, PATCHES,
                                processor.image_wrap)
    start = ids.index(403)
    assert ids[start - 1] == 401 and ids[start + PATCHES] == 402 and ids.count(403) == PATCHES
    assert labels[start - 1] == labels[start + PATCHES] == IGNORE_INDEX


def test_original_mistral_and_cls_patch(tokenizer_dir, tmp_path):
    """A llava_mistral config, all-token features (cls_patch), the conv mode from the name."""
    ref = build_reference(strategy="full", seed=3)
    clip = clip_folder(ref, tmp_path / "clip")
    src = write_original(ref, tmp_path / "llava-mistral-tiny", tokenizer_dir, clip, kind="safetensors", shards=1,
                         model_type="llava_mistral", architectures=["LlavaMistralForCausalLM"],
                         mm_vision_select_feature="cls_patch")
    convert(str(src), str(tmp_path / "out"), dtype="float32")
    model, config = load_model(tmp_path / "out")
    assert config["text_config"]["model_type"] == "mistral"
    assert config["conv_mode"] == "mistral_instruct"
    assert config["vision_feature_select_strategy"] == "full"
    assert max_error(ref, model) < 1e-4


def test_quantized_8bit_is_close(ref, clip, tokenizer_dir, tmp_path):
    src = write_original(ref, tmp_path / "llava-v1.5-tiny", tokenizer_dir, clip)
    summary = convert(str(src), str(tmp_path / "out"), quantize=True, q_bits=8, q_group_size=32)
    model, config = load_model(tmp_path / "out")
    assert config["quantization"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    assert cosine(ref, model) > 0.99
    weights = mx.load(str(tmp_path / "out" / "model.safetensors"))
    # embeddings and lm_head too, as mlx-lm; the vision tower only when asked
    for name in ("language_model.model.embed_tokens", "language_model.lm_head",
                 "language_model.model.layers.0.mlp.down_proj", "multi_modal_projector.linear_2"):
        assert f"{name}.scales" in weights
    assert not any(k.startswith("vision_tower.") and k.endswith(".scales") for k in weights)
    assert weights["language_model.model.norm.weight"].dtype == mx.float16
    assert 8 < summary.bits_per_weight < 16


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the fallback is for MLX's CPU backend")
def test_float16_scales_become_float32_on_the_cpu(ref, clip, tokenizer_dir, tmp_path, capsys):
    """4-bit with float16 scales (convert -q's default) runs ~35x slower on
    MLX's CPU backend: load casts them to float32, says so in one line, and
    answers within the quantized model's own tolerance of the reference."""
    src = write_original(ref, tmp_path / "llava-v1.5-tiny", tokenizer_dir, clip)
    summary = convert(str(src), str(tmp_path / "q4"), quantize=True, q_bits=4, q_group_size=32)
    assert summary.scales_dtype == "float16" and "float16 scales" in str(summary)
    capsys.readouterr()
    fast, _ = load_model(tmp_path / "q4")
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "float16 scales" in said[0] and "--dtype float32" in said[0]
    slow, _ = load_model(tmp_path / "q4", cpu_fallback=False)
    scales = lambda m: m.language_model.model.layers[0].mlp.up_proj.scales.dtype
    assert (scales(fast), scales(slow)) == (mx.float32, mx.float16)
    # The same quantized weights, computed in float32 rather than float16:
    # as close to the reference as the model as written, and close to it.
    assert cosine(ref, fast) > cosine(ref, slow) - 1e-3 > 0.95
    a, b = logits(ref, fast)[1], logits(ref, slow)[1]
    assert np.abs(a - b).max() < 1e-2 * np.abs(b).max()
    convert(str(src), str(tmp_path / "q4-32"), quantize=True, q_bits=4, q_group_size=32, dtype="float32")
    capsys.readouterr()
    q32, _ = load_model(tmp_path / "q4-32")
    assert capsys.readouterr().err == ""
    assert cosine(ref, q32) > 0.95


def test_quantize_vision_and_undivided_layers(ref, clip, tokenizer_dir, tmp_path):
    src = write_original(ref, tmp_path / "llava-v1.5-tiny", tokenizer_dir, clip, kind="safetensors")
    convert(str(src), str(tmp_path / "q32"), quantize=True, q_bits=8, q_group_size=32, quantize_vision=True)
    weights = mx.load(str(tmp_path / "q32" / "model.safetensors"))
    assert "vision_tower.vision_model.encoder.layers.0.mlp.fc1.scales" in weights
    # our CLIP adds the position table directly: never packed
    assert "vision_tower.vision_model.embeddings.position_embedding.scales" not in weights
    model, _ = load_model(tmp_path / "q32")
    assert cosine(ref, model) > 0.99
    # group size 128 divides no vision layer (32 wide) nor the 64-wide LM ones: they stay full
    convert(str(src), str(tmp_path / "q128"), quantize=True, q_bits=4, q_group_size=128, quantize_vision=True)
    weights = mx.load(str(tmp_path / "q128" / "model.safetensors"))
    assert "language_model.model.layers.0.mlp.down_proj.scales" in weights  # 128 wide
    assert "language_model.model.layers.0.self_attn.q_proj.scales" not in weights  # 64 wide
    assert not any(k.startswith("vision_tower.") and k.endswith(".scales") for k in weights)
    load_model(tmp_path / "q128")


def test_output_shards_with_index(ref, clip, tokenizer_dir, tmp_path):
    src = write_original(ref, tmp_path / "llava-v1.5-tiny", tokenizer_dir, clip)
    convert(str(src), str(tmp_path / "out"), dtype="float32", max_shard_gb=0.0002)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / "out" / s).stat().st_size < 300_000 for s in shards)
    model, _ = load_model(tmp_path / "out")
    assert max_error(ref, model) < 1e-4


def test_bfloat16_source_and_dtype(ref, clip, tokenizer_dir, tmp_path):
    bf16 = copy.deepcopy(ref).to(torch.bfloat16)
    src = write_original(bf16, tmp_path / "llava-v1.5-tiny", tokenizer_dir, clip, kind="bin")
    convert(str(src), str(tmp_path / "out"), dtype="bfloat16")
    weights = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert weights["language_model.lm_head.weight"].dtype == mx.bfloat16
    expected = bf16.lm_head.weight.detach().float().numpy()
    assert np.array_equal(np.array(weights["language_model.lm_head.weight"].astype(mx.float32)), expected)


# ---------------------------------------------------------------- 2. stage 1


def test_stage1_projector_with_model_base(ref, clip, tokenizer_dir, tmp_path):
    base = write_base(ref, tmp_path / "vicuna-tiny", tokenizer_dir)
    stage1 = tmp_path / "llava-v1.5-tiny-pretrain"
    stage1.mkdir()
    torch.save({k: v.clone() for k, v in projector_state(ref, "mlp2x_gelu").items()}, stage1 / "mm_projector.bin")
    (stage1 / "config.json").write_text(json.dumps(original_config(ref, clip, image_aspect_ratio="square")))
    with pytest.raises(LlavaError, match="--model-base"):
        convert(str(stage1), str(tmp_path / "out"))
    convert(str(stage1), str(tmp_path / "out"), dtype="float32", model_base=str(base))
    model, config = load_model(tmp_path / "out")
    assert config["conv_mode"] == "plain" and config["image_aspect_ratio"] == "crop"
    assert max_error(ref, model) < 1e-4
    convert(str(stage1), str(tmp_path / "q8"), quantize=True, q_bits=8, q_group_size=32, model_base=str(base))
    model, config = load_model(tmp_path / "q8")
    assert config["quantization"]["bits"] == 8
    assert cosine(ref, model) > 0.99


def test_stage1_without_config(linear_ref, tokenizer_dir, tmp_path):
    """A lone mm_projector.bin: the projector type comes from its keys."""
    clip = clip_folder(linear_ref, tmp_path / "clip")
    base = write_base(linear_ref, tmp_path / "vicuna-tiny", tokenizer_dir, kind="bin")
    stage1 = tmp_path / "pretrain"
    stage1.mkdir()
    torch.save({k: v.clone() for k, v in projector_state(linear_ref, "linear").items()}, stage1 / "mm_projector.bin")
    convert(str(stage1), str(tmp_path / "out"), dtype="float32", model_base=str(base), vision_tower=str(clip))
    model, config = load_model(tmp_path / "out")
    assert config["projector_type"] == "linear"
    assert max_error(linear_ref, model) < 1e-4


# ---------------------------------------------------------------- 3. LoRA


@pytest.mark.parametrize("kind", ["bin", "safetensors"])
def test_lora_is_merged_into_the_base(ref, clip, tokenizer_dir, tmp_path, kind):
    """A peft adapter (r 4, alpha 8) on the attention and MLP of every layer,
    the projector in non_lora_trainables.bin; the expected model is merged in torch."""
    base = write_base(ref, tmp_path / "vicuna-tiny", tokenizer_dir)
    merged = copy.deepcopy(ref)
    with torch.no_grad():  # the trained projector differs from anything in the base
        for p in merged.model.multi_modal_projector.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    r, alpha = 4, 8
    adapter, gen = {}, torch.Generator().manual_seed(5)
    targets = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    with torch.no_grad():
        for i, layer in enumerate(merged.model.language_model.layers):
            for target in targets:
                linear = layer.get_submodule(target)
                a = torch.randn(r, linear.in_features, generator=gen) * 0.1
                b = torch.randn(linear.out_features, r, generator=gen) * 0.1
                linear.weight.add_(alpha / r * b @ a)
                prefix = f"base_model.model.model.layers.{i}.{target}"
                adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"] = a, b
    lora = tmp_path / "llava-v1.5-tiny-lora"
    lora.mkdir()
    if kind == "bin":
        torch.save(adapter, lora / "adapter_model.bin")
    else:
        save_file(adapter, lora / "adapter_model.safetensors")
    (lora / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_dropout": 0.05, "bias": "none",
        "target_modules": ["q_proj", "v_proj", "down_proj"], "task_type": "CAUSAL_LM"}))
    torch.save({"base_model.model." + k: v.clone() for k, v in projector_state(merged, "mlp2x_gelu").items()},
               lora / "non_lora_trainables.bin")
    (lora / "config.json").write_text(json.dumps(original_config(ref, clip)))
    convert(str(lora), str(tmp_path / "out"), dtype="float32", model_base=str(base))
    model, config = load_model(tmp_path / "out")
    assert config["conv_mode"] == "llava_v1"
    assert max_error(merged, model) < 1e-4
    assert max_error(ref, model) > 1e-2  # the adapter did change the model
    convert(str(lora), str(tmp_path / "q8"), quantize=True, q_bits=8, q_group_size=32, model_base=str(base))
    model, config = load_model(tmp_path / "q8")
    assert config["quantization"]["bits"] == 8
    assert cosine(merged, model) > 0.99


# ---------------------------------------------------------------- 4. llava-hf


def hf_spellings(src: Path, dst: Path, spelling: str):
    """The same llava-hf checkpoint with its keys as transformers 4 or 5 write them."""
    shutil.copytree(src, dst)
    weights = mx.load(str(dst / "model.safetensors"))

    def name(k):
        k = k.replace("vision_tower.embeddings", "vision_tower.vision_model.embeddings")
        for part in ("encoder", "pre_layrnorm", "post_layernorm"):
            k = k.replace(f"vision_tower.{part}", f"vision_tower.vision_model.{part}")
        if spelling == "transformers5":
            if k.startswith("language_model.model."):
                return "model.language_model." + k[len("language_model.model."):]
            if k.startswith("language_model.lm_head."):
                return k[len("language_model."):]
            return "model." + k
        return k

    mx.save_safetensors(str(dst / "model.safetensors"), {name(k): v for k, v in weights.items()})
    return dst


def as_bin_shards(folder: Path):
    """The folder's safetensors as two torch.save .bin shards with an index."""
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    save_state(state, folder, "bin", shards=2)
    return folder


@pytest.mark.parametrize("spelling", ["as-saved", "transformers4", "transformers4-bin", "transformers5"])
def test_llava_hf(ref, tokenizer_dir, tmp_path, spelling):
    src = save_reference(ref, tmp_path / "llava-1.5-tiny-hf", tokenizer_dir)
    if spelling != "as-saved":
        src = hf_spellings(src, tmp_path / spelling, spelling.removesuffix("-bin"))
    if spelling.endswith("-bin"):
        src = as_bin_shards(src)
        assert not list(src.glob("*.safetensors")) and (src / "pytorch_model.bin.index.json").is_file()
    summary = convert(str(src), str(tmp_path / "out"), dtype="float32")
    assert summary.kind == "llava-hf"
    model, config = load_model(tmp_path / "out")
    assert max_error(ref, model) < 1e-4
    assert config["image_token_index"] == VOCAB and config["conv_mode"] == "llava_v1"


def test_llava_hf_8bit(ref, tokenizer_dir, tmp_path):
    src = save_reference(ref, tmp_path / "llava-1.5-tiny-hf", tokenizer_dir)
    convert(str(src), str(tmp_path / "out"), quantize=True, q_bits=8, q_group_size=64)
    model, _ = load_model(tmp_path / "out")
    assert cosine(ref, model) > 0.99


# ---------------------------------------------------------------- 5. mlx-vlm


@pytest.fixture(scope="module")
def mlx_dirs(ref, tokenizer_dir, tmp_path_factory):
    """MLX directories as mlx-vlm writes them: float32, float16, and 8-bit with the vision tower packed too."""
    from mlx_llava.processor import Processor

    root = tmp_path_factory.mktemp("mlx-vlm")
    hf = save_reference(ref, root / "hf", tokenizer_dir)
    model, config = load_model(hf)
    processor = Processor.from_dir(hf, config)
    fp32 = save_model(root / "llava-1.5-tiny-fp32", model, config, processor)
    model.set_dtype(mx.float16)
    fp16 = save_model(root / "llava-1.5-tiny-fp16", model, config, processor)
    model, qconfig = quantize(model, config, bits=8, group_size=32, quantize_vision=True)
    q8 = save_model(root / "llava-1.5-tiny-8bit", model, qconfig, processor)
    return fp32, fp16, q8


def test_mlx_vlm_float32_and_8bit(ref, mlx_dirs, tmp_path):
    """A float32 MLX directory keeps its dtype (no --dtype) and answers like
    transformers; quantized to 8 bits it stays close."""
    fp32 = mlx_dirs[0]
    assert convert(str(fp32), str(tmp_path / "fp32")).kind == "mlx-vlm"
    weights = mx.load(str(tmp_path / "fp32" / "model.safetensors"))
    assert weights["language_model.lm_head.weight"].dtype == mx.float32
    model, _ = load_model(tmp_path / "fp32")
    assert max_error(ref, model) < 1e-4
    convert(str(fp32), str(tmp_path / "q8"), quantize=True, q_bits=8, q_group_size=32)
    model, config = load_model(tmp_path / "q8")
    assert config["quantization"]["bits"] == 8
    assert cosine(ref, model) > 0.99


def test_mlx_vlm_copied_as_is(ref, mlx_dirs, tmp_path):
    _, fp16, q8 = mlx_dirs
    assert convert(str(fp16), str(tmp_path / "fp16")).kind == "mlx-vlm"
    model, _ = load_model(tmp_path / "fp16")
    assert cosine(ref, model) > 0.999
    convert(str(q8), str(tmp_path / "q8"))
    theirs = mx.load(str(q8 / "model.safetensors"))
    ours = mx.load(str(tmp_path / "q8" / "model.safetensors"))
    name = "language_model.model.layers.0.mlp.up_proj"
    for leaf in ("weight", "scales", "biases"):
        assert mx.array_equal(theirs[f"{name}.{leaf}"], ours[f"{name}.{leaf}"])
    # a packed position table (our CLIP reads it directly) comes back unpacked
    assert "vision_tower.vision_model.embeddings.position_embedding.scales" not in ours
    assert json.loads((tmp_path / "q8" / "config.json").read_text())["quantization"]["bits"] == 8
    model, _ = load_model(tmp_path / "q8")
    assert cosine(ref, model) > 0.99


def test_mlx_vlm_requantized(ref, mlx_dirs, tmp_path):
    _, _, q8 = mlx_dirs
    convert(str(q8), str(tmp_path / "out"), quantize=True, q_bits=8, q_group_size=64)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    weights = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert weights["language_model.model.layers.0.mlp.up_proj.scales"].shape == (TEXT["intermediate_size"], 1)
    assert not any(k.startswith("vision_tower.") and k.endswith(".scales") for k in weights)
    model, _ = load_model(tmp_path / "out")
    assert cosine(ref, model) > 0.99


# ---------------------------------------------------------------- hub


def hub_cache(root: Path, repo: str, folder: Path) -> Path:
    """A folder placed in huggingface_hub's cache layout, as a download leaves it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return root


def test_hub_repo_from_the_offline_cache(ref, clip, tokenizer_dir, tmp_path):
    """--hf org/name and the config's mm_vision_tower org/clip both come from the cache."""
    cache = tmp_path / "hub"
    hub_cache(cache, "tiny-org/clip-vit-tiny", clip)
    src = write_original(ref, tmp_path / "src", tokenizer_dir, "tiny-org/clip-vit-tiny")
    hub_cache(cache, "tiny-org/llava-v1.5-tiny", src)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    out = tmp_path / "out"
    result = run_cli("--hf", "tiny-org/llava-v1.5-tiny", "--mlx-path", out, "--dtype", "float32", env=env)
    assert result.returncode == 0, result.stderr
    assert "bits per weight: 32.00" in result.stdout and "size on disk" in result.stdout
    model, _ = load_model(out)
    assert max_error(ref, model) < 1e-4
    assert "mlx-llava convert --hf tiny-org/llava-v1.5-tiny" in (out / "README.md").read_text()
    missing = run_cli("--hf", "tiny-org/absent", "--mlx-path", tmp_path / "o2", env=env)
    assert_one_line_error(missing, "not in the Hugging Face cache")
    assert_nothing_left(tmp_path / "o2")


# ---------------------------------------------------------------- refusals


def test_hostile_bin_is_refused_and_never_runs(ref, clip, tokenizer_dir, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    src = write_original(ref, tmp_path / "llava-v1.5-tiny", tokenizer_dir, clip, shards=1)
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "x": Payload()}, src / "pytorch_model.bin")
    out = tmp_path / "out"
    result = run_cli("--hf", src, "--mlx-path", out)
    assert_one_line_error(result, "refusing to load")
    assert not marker.exists()
    assert_nothing_left(out)


@pytest.fixture
def good_source(ref, clip, tokenizer_dir, tmp_path):
    return write_original(ref, tmp_path / "llava-v1.5-tiny", tokenizer_dir, clip, kind="safetensors")


def truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("kind", ["bin", "safetensors"])
def test_truncated_shard(ref, clip, tokenizer_dir, tmp_path, cli, kind):
    src = write_original(ref, tmp_path / "llava-v1.5-tiny", tokenizer_dir, clip, kind=kind)
    stem = "pytorch_model" if kind == "bin" else "model"
    truncate(src / f"{stem}-00002-of-00002.{kind}")
    result = cli("--hf", src, "--mlx-path", tmp_path / "out")
    assert_one_line_error(result, "truncated")
    assert_nothing_left(tmp_path / "out")


def test_missing_shard(good_source, tmp_path, cli):
    (good_source / "model-00001-of-00002.safetensors").unlink()
    result = cli("--hf", good_source, "--mlx-path", tmp_path / "out")
    assert_one_line_error(result, "missing weight shard model-00001-of-00002.safetensors")
    assert_nothing_left(tmp_path / "out")


def test_unknown_model_type(good_source, tmp_path, cli):
    config = json.loads((good_source / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("mm_")}
    (good_source / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    result = cli("--hf", good_source, "--mlx-path", tmp_path / "out")
    assert_one_line_error(result, "unknown model type 'bert'")
    assert_nothing_left(tmp_path / "out")


def test_no_vision_tower(good_source, tmp_path, cli):
    config = json.loads((good_source / "config.json").read_text())
    del config["mm_vision_tower"]
    (good_source / "config.json").write_text(json.dumps(config))
    result = cli("--hf", good_source, "--mlx-path", tmp_path / "out")
    assert_one_line_error(result, "names no vision tower")
    assert_nothing_left(tmp_path / "out")


def test_weights_that_do_not_fit_the_config(good_source, tmp_path, cli):
    config = json.loads((good_source / "config.json").read_text())
    (good_source / "config.json").write_text(json.dumps({**config, "mm_projector_type": "linear"}))
    result = cli("--hf", good_source, "--mlx-path", tmp_path / "out")
    assert_one_line_error(result, "multi_modal_projector.linear_2")
    assert_nothing_left(tmp_path / "out")


def test_existing_output_needs_force(good_source, tmp_path, cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(cli("--hf", good_source, "--mlx-path", out), "already exists")
    assert (out / "keep.txt").exists()
    result = cli("--hf", good_source, "--mlx-path", out, "--force", "--q-bits", "8", "-q")
    assert result.returncode == 0, result.stderr
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_help_lists_the_flags(cli):
    """`mlx-llava convert` is registered, with the issue's flags."""
    result = cli("--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--hf", "--mlx-path", "--dtype", "-q", "--q-bits", "--q-group-size", "--quantize-vision",
                 "--vision-tower", "--model-base", "--upload-repo"):
        assert flag in result.stdout, flag


def test_bad_options(good_source, tmp_path, cli):
    assert_one_line_error(cli("--hf", good_source, "--mlx-path", tmp_path / "o", "-q", "--q-bits", "3"), "--q-bits")
    assert_one_line_error(cli("--hf", good_source, "--mlx-path", tmp_path / "o", "--dtype", "int8"), "dtype")
    assert_one_line_error(cli("--hf", good_source, "--mlx-path", tmp_path / "o", "--conv-mode", "nope"), "conv mode")
    assert_nothing_left(tmp_path / "o")


def test_interrupted_conversion_leaves_nothing(good_source, tmp_path):
    def interrupted(name, done, total):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(str(good_source), str(tmp_path / "out"), on_tensor=interrupted)
    assert_nothing_left(tmp_path / "out")
