"""LLaVA-1.6 (LLaVA-NeXT) end to end: every published form converts, loads and
answers like its reference.

- llava-hf: a tiny random LlavaNextForConditionalGeneration made with
  transformers, in both key spellings; its logits and visual-token counts
  are transformers' own, for 0, 1 and 2 images of different shapes, and a
  batch.
- the original (haotian-liu/LLaVA): the same weights in its layout (vision
  tower inside, `model.image_newline`, pinpoints as (width, height),
  `mm_patch_merge_type: spatial_unpad`), against a torch reference spliced
  by hand along the original's code path (tests/reference_llava.py).
- mlx-vlm / mlx-community style MLX folders, quantized or not.
"""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from PIL import Image

import mlx_llava
import reference_llava as ref_rules
from conftest import TEXT, VISION, VOCAB
from mlx_llava.convert import convert
from mlx_llava.weights import load_model, quantize, save_model
from test_convert import clip_folder, hf_spellings, write_original

PINS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
CROP, SIDE = VISION["image_size"], VISION["image_size"] // VISION["patch_size"]
# (width, height): a landscape, a portrait, a tiny one (where the original and
# transformers pick different grids) and one whose unpadded height the original truncates
IMAGES = {"landscape": (50, 30), "portrait": (20, 45), "tiny": (9, 7), "odd": (188, 47)}


def noise(size, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def build_next(seed=0, pins=PINS):
    """A transformers LlavaNextForConditionalGeneration with random float32 weights."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    config = LlavaNextConfig(vision_config=CLIPVisionConfig(**VISION), text_config=LlamaConfig(**TEXT),
                             image_token_index=VOCAB, image_grid_pinpoints=pins)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_processor(pins=PINS):
    from transformers import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP},
                                      image_grid_pinpoints=pins)


def save_next(model, path: Path, tokenizer_dir: Path) -> Path:
    """A llava-hf LLaVA-1.6 folder: weights, config, tokenizer, LlavaNextImageProcessor."""
    model.save_pretrained(path)
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            shutil.copy(f, path / f.name)
    hf_processor(model.config.image_grid_pinpoints).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ref():
    return build_next(seed=11)


@pytest.fixture(scope="module")
def hf_dir(ref, tokenizer_dir, tmp_path_factory):
    return save_next(ref, tmp_path_factory.mktemp("next") / "llava-v1.6-tiny-hf", tokenizer_dir)


def prompt_for(n):
    return "USER: " + "<image>\n" * n + "What is in the picture? ASSISTANT:"


def transformers_logits(ref, ids, images):
    """transformers' logits for our ids, with its own preprocessing; and its per-image token counts."""
    kw, counts = {}, []
    if images:
        out = hf_processor(ref.config.image_grid_pinpoints)(images, return_tensors="pt")
        kw = {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}
        with torch.no_grad():
            counts = [f.shape[0] for f in ref.model.get_image_features(**kw).pooler_output]
    with torch.no_grad():
        logits = ref(input_ids=torch.tensor(np.array(ids)), **kw).logits.numpy()
    return logits, counts


def our_logits(model, inputs):
    out = model(inputs["input_ids"], inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    return np.array(out.astype(mx.float32))


# ---------------------------------------------------------------- llava-hf


@pytest.mark.parametrize("n_images", [0, 1, 2])
@pytest.mark.parametrize("spelling", ["as-saved", "transformers4", "transformers5"])
def test_llava_hf_logits_and_token_counts(ref, hf_dir, tmp_path, n_images, spelling):
    src = hf_dir if spelling == "as-saved" else hf_spellings(hf_dir, tmp_path / spelling, spelling)
    summary = convert(str(src), str(tmp_path / "out"), dtype="float32")
    assert summary.kind == "llava-hf"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "llava_next" and config["image_aspect_ratio"] == "anyres"
    assert config["image_grid_pinpoints"] == PINS and config["unpad_rounding"] == "round"
    model, processor = mlx_llava.load(tmp_path / "out")
    images = [noise(IMAGES[k], seed=i) for i, k in enumerate(["landscape", "portrait"][:n_images])]
    inputs = processor(prompt_for(n_images), images)
    expected, counts = transformers_logits(ref, inputs["input_ids"], images)
    assert counts == [processor.visual_tokens((im.height, im.width)) for im in images]
    assert len(set(counts)) == n_images  # the two images give different counts
    assert np.abs(expected - our_logits(model, inputs)).max() < 1e-4


def test_llava_hf_folder_loads_as_it_is(ref, hf_dir):
    """`load` reads a llava-hf LLaVA-1.6 folder without converting it; tiny and
    odd images follow transformers' rules (pinpoints (height, width), rounded unpad)."""
    model, processor = mlx_llava.load(hf_dir)
    assert processor.image_config.image_aspect_ratio == "anyres"
    images = [noise(IMAGES["tiny"], 1), noise(IMAGES["odd"], 2)]
    inputs = processor(prompt_for(2), images)
    expected, counts = transformers_logits(ref, inputs["input_ids"], images)
    assert counts == [processor.visual_tokens((im.height, im.width)) for im in images]
    assert np.abs(expected - our_logits(model, inputs)).max() < 1e-4


def test_a_batch_of_prompts_with_different_images(ref, hf_dir):
    """Rows of different lengths and images of different token counts in one
    batch: each row answers as it does alone (right padding, causal model)."""
    model, processor = mlx_llava.load(hf_dir)
    rows = [[noise(IMAGES["portrait"], 3)], [noise(IMAGES["landscape"], 4), noise(IMAGES["odd"], 5)]]
    single = [processor(prompt_for(len(images)), images) for images in rows]
    width = max(s["input_ids"].shape[1] for s in single)
    ids = mx.array(np.stack([np.pad(np.array(s["input_ids"][0]), (0, width - s["input_ids"].shape[1]))
                             for s in single]))
    pixels = mx.concatenate([s["pixel_values"] for s in single])
    sizes = [size for s in single for size in s["image_sizes"]]
    batched = np.array(model(ids, pixels, image_sizes=sizes))
    for row, s in enumerate(single):
        expected, _ = transformers_logits(ref, s["input_ids"], [im for im in rows[row]])
        n = s["input_ids"].shape[1]
        assert np.abs(expected[0] - batched[row, :n]).max() < 1e-4


def test_llava_hf_quantized(ref, hf_dir, tmp_path):
    convert(str(hf_dir), str(tmp_path / "q8"), quantize=True, q_bits=8, q_group_size=32)
    model, processor = mlx_llava.load(tmp_path / "q8")
    assert json.loads((tmp_path / "q8" / "config.json").read_text())["quantization"]["bits"] == 8
    images = [noise(IMAGES["landscape"])]
    inputs = processor(prompt_for(1), images)
    expected, _ = transformers_logits(ref, inputs["input_ids"], images)
    ours = our_logits(model, inputs)
    cosine = float((expected.ravel() @ ours.ravel()) / np.linalg.norm(expected) / np.linalg.norm(ours))
    assert cosine > 0.99


# ---------------------------------------------------------------- mlx-vlm


def test_mlx_vlm_llava_next_folders(ref, hf_dir, tmp_path):
    """MLX folders as mlx-vlm writes llava_next (model_type llava_next, image_newline
    at the top), float and 8-bit, convert (kept or requantized) and load."""
    model, config = load_model(hf_dir)
    processor = mlx_llava.processor.Processor.from_dir(hf_dir, config)
    config = {k: v for k, v in config.items() if k not in ("image_aspect_ratio", "conv_mode")}
    fp32 = save_model(tmp_path / "llava-v1.6-tiny-mlx", model, config, processor)
    q, qconfig = quantize(model, config, bits=8, group_size=32)
    q8 = save_model(tmp_path / "llava-v1.6-tiny-8bit", q, qconfig, processor)
    assert "image_newline" in mx.load(str(q8 / "model.safetensors"))
    images = [noise(IMAGES["portrait"])]
    for src, out, kw in ((fp32, "a", {}), (q8, "b", {}), (q8, "c", dict(quantize=True, q_bits=4, q_group_size=32))):
        summary = convert(str(src), str(tmp_path / out), **kw)
        assert summary.kind == "mlx-vlm"
        model, processor = mlx_llava.load(tmp_path / out)
        inputs = processor(prompt_for(1), images)
        expected, _ = transformers_logits(ref, inputs["input_ids"], images)
        ours = our_logits(model, inputs)
        cosine = float((expected.ravel() @ ours.ravel()) / np.linalg.norm(expected) / np.linalg.norm(ours))
        assert cosine > (0.9999 if out == "a" else 0.95), out


# ---------------------------------------------------------------- the original layout


def original_reference_logits(ref, ids, images, pins_wh, image_index):
    """The original's path, by hand: each image's crops by its rules, every
    crop through CLIP in one batch (hidden_states[-2], CLS dropped), the
    projector, the spatial_unpad merge with image_newline, spliced into the
    word embeddings where the image goes (`ids` holds one `image_index` per
    image), then the language model."""
    from transformers import CLIPImageProcessorPil

    clip = CLIPImageProcessorPil(size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP})
    crops = [ref_rules.anyres_crops(im, pins_wh, CROP) for im in images]
    with torch.no_grad():
        tokens = []
        if images:
            pixels = torch.tensor(np.asarray(clip([c for cs in crops for c in cs], return_tensors="np")["pixel_values"]))
            hidden = ref.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
            projected = torch.split(ref.model.multi_modal_projector(hidden), [len(cs) for cs in crops])
            tokens = [ref_rules.anyres_merge(p, im.size, pins_wh, CROP, SIDE, ref.model.image_newline)
                      for p, im in zip(projected, images)]
        embed = ref.model.language_model.embed_tokens
        pieces, text, k = [], [], 0
        for t in ids:
            if t == image_index:
                pieces += [embed(torch.tensor(text)), tokens[k]] if text else [tokens[k]]
                text, k = [], k + 1
            else:
                text.append(t)
        pieces += [embed(torch.tensor(text))] if text else []
        hidden = ref.model.language_model(inputs_embeds=torch.cat(pieces)[None]).last_hidden_state
        return ref.lm_head(hidden)[0].numpy()


@pytest.fixture(scope="module")
def original_dir(tokenizer_dir, tmp_path_factory):
    """(reference, an original-layout LLaVA-1.6 checkpoint of it): the tuned
    vision tower inside, while mm_vision_tower names a different CLIP."""
    ref = build_next(seed=12, pins=PINS)
    root = tmp_path_factory.mktemp("original16")
    other = clip_folder(build_next(seed=13), root / "clip-vit-tiny")
    src = write_original(ref, root / "llava-v1.6-vicuna-tiny", tokenizer_dir, other, kind="safetensors",
                         with_vision=True, extra={"model.image_newline": ref.model.image_newline},
                         image_aspect_ratio="anyres", image_grid_pinpoints=PINS, mm_patch_merge_type="spatial_unpad",
                         unfreeze_mm_vision_tower=True, mm_vision_tower_lr=2e-6, image_crop_resolution=224,
                         image_split_resolution=224)
    return ref, src


@pytest.mark.parametrize("names", [["landscape", "tiny"], ["odd"], ["portrait"], []])
def test_original_checkpoint_matches_its_own_code_path(original_dir, tmp_path, names):
    ref, src = original_dir
    summary = convert(str(src), str(tmp_path / "out"), dtype="float32")
    assert summary.kind == "original"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["image_grid_pinpoints"] == [[h, w] for w, h in PINS]  # (height, width), pair by pair
    assert config["unpad_rounding"] == "truncate" and config["mm_patch_merge_type"] == "spatial_unpad"
    assert config["conv_mode"] == "llava_v1" and "image_crop_resolution" not in config["text_config"]
    model, processor = mlx_llava.load(tmp_path / "out")
    images = [noise(IMAGES[k], seed=i + 7) for i, k in enumerate(names)]
    inputs = processor(prompt_for(len(images)), images)
    ids = [int(t) for t in np.array(inputs["input_ids"][0])]
    collapsed = [t for i, t in enumerate(ids) if t != VOCAB or i == 0 or ids[i - 1] != VOCAB]
    expected = original_reference_logits(ref, collapsed, images, PINS, VOCAB)
    ours = our_logits(model, inputs)[0]
    assert ours.shape == expected.shape  # the visual token counts are the original's
    assert np.abs(expected - ours).max() < 1e-4


def test_original_differs_from_transformers_where_the_rules_do(original_dir, tmp_path):
    """The same weights read as llava-hf would pick another grid for the tiny
    image and keep two more columns of the odd one: the original's rules matter."""
    ref, src = original_dir
    convert(str(src), str(tmp_path / "out"), dtype="float32")
    _, original = mlx_llava.load(tmp_path / "out")
    from mlx_llava.anyres import AnyRes

    theirs = AnyRes(tuple(map(tuple, PINS)), CROP, VISION["patch_size"])
    for name in ("tiny", "odd"):
        w, h = IMAGES[name]
        assert original.anyres.grid((h, w)) != theirs.grid((h, w)) or \
            original.visual_tokens((h, w)) != theirs.num_tokens((h, w)), name


def test_original_quantized_and_refusals(original_dir, tmp_path):
    ref, src = original_dir
    convert(str(src), str(tmp_path / "q4"), quantize=True, q_bits=4, q_group_size=32)
    model, processor = mlx_llava.load(tmp_path / "q4")
    assert processor.anyres is not None and "image_newline" in model
    config = json.loads((src / "config.json").read_text())
    (src.parent / "onevision").mkdir()
    for f in src.iterdir():
        shutil.copy(f, src.parent / "onevision" / f.name)
    (src.parent / "onevision" / "config.json").write_text(json.dumps({**config, "image_aspect_ratio": "anyres_max_9"}))
    with pytest.raises(mlx_llava.LlavaError, match="SigLIP"):
        convert(str(src.parent / "onevision"), str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def next_data(tmp_path_factory):
    """Stage-2 records on images of several shapes (so several visual-token counts)."""
    root = tmp_path_factory.mktemp("next-data")
    (root / "images").mkdir()
    records = []
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
    shapes = [(50, 30), (20, 45), (9, 7), (60, 60)]
    for i, ((name, rgb), (w, h)) in enumerate(zip(list(colours.items()) * 2, shapes * 2)):
        image = Image.new("RGB", (w, h), (255, 255, 255))
        image.paste(rgb, (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
        image.save(root / "images" / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the square?"}, {"from": "gpt", "value": name}]})
    (root / "data.json").write_text(json.dumps(records))
    return root


def train_next(hf_dir, data, out, on_step=None, **kw):
    from mlx_llava.train import TrainConfig, train

    options = dict(stage=2, model=str(hf_dir), data=str(data / "data.json"), image_folder=str(data / "images"),
                   output=str(out), batch_size=4, iters=6, learning_rate=1e-2, projector_lr=1e-2, lora_rank=4,
                   lora_alpha=8, lora_dropout=0.0, warmup_ratio=0.0, save_every=100, seed=0, progress=False)
    options.update(kw)
    return train(TrainConfig(**options), on_step=on_step)


def losses_of(out):
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_prepare_counts_each_images_tokens(hf_dir, next_data):
    from mlx_llava.train.data import prepare

    _, processor = mlx_llava.load(hf_dir)
    data = prepare(next_data / "data.json", processor.encoder, "vicuna_v1", processor.image_token_index,
                   processor.visual_tokens, str(next_data / "images"), 2048)
    counts = [e.input_ids.count(VOCAB) for e in data.examples]
    assert counts == [processor.visual_tokens((e.image_size)) for e in data.examples]
    assert counts == [processor.anyres.num_tokens(Image.open(e.image).size[::-1]) for e in data.examples]
    assert len(set(counts)) > 2


class Stop(Exception):
    pass


def test_lora_with_a_trainable_vision_tower_resumes_fuses_and_converts(hf_dir, next_data, tmp_path):
    """LLaVA-1.6 stage 2: LoRA, the projector and image_newline, and the vision
    tower at its own rate; the loss falls; a killed run resumes exactly; the
    fused model answers as model + adapters, and converts back and loads."""
    from mlx_llava.adapters import fuse

    common = dict(vision_tower_lr=1e-3, save_every=2)
    train_next(hf_dir, next_data, tmp_path / "straight", **common)
    losses = losses_of(tmp_path / "straight")
    assert np.mean(losses[-2:]) < losses[0]
    saved = {name: mx.load(str(tmp_path / "straight" / name))
             for name in ("adapters.safetensors", "projector.safetensors", "vision_tower.safetensors")}
    before, _ = load_model(hf_dir)
    assert "image_newline" in saved["projector.safetensors"]
    assert not mx.array_equal(saved["projector.safetensors"]["image_newline"], before.image_newline)
    tower = dict(tree_flatten(before.vision_tower.parameters()))
    assert any(not mx.array_equal(v, tower[k.removeprefix("vision_tower.")])
               for k, v in saved["vision_tower.safetensors"].items())  # the vision tower learned

    def crash(step, loss):
        if step == 3:
            raise Stop()

    with pytest.raises(Stop):
        train_next(hf_dir, next_data, tmp_path / "resumed", on_step=crash, **common)
    train_next(hf_dir, next_data, tmp_path / "resumed", resume=True, **common)
    for name, tensors in saved.items():
        resumed = mx.load(str(tmp_path / "resumed" / name))
        for k, v in tensors.items():
            assert np.allclose(np.array(v), np.array(resumed[k]), atol=1e-5), (name, k)

    fuse(hf_dir, tmp_path / "straight", tmp_path / "fused")
    with_adapters, processor = mlx_llava.load(hf_dir, adapter_path=tmp_path / "straight")
    fused, _ = mlx_llava.load(tmp_path / "fused")
    convert(str(tmp_path / "fused"), str(tmp_path / "back"), dtype="float32")
    back, back_processor = mlx_llava.load(tmp_path / "back")
    image = next_data / "images" / "2.png"
    inputs = processor(prompt_for(1), [image])
    a, b = our_logits(with_adapters, inputs), our_logits(fused, inputs)
    assert np.abs(a - b).max() < 1e-4
    assert back_processor(prompt_for(1), [image])["input_ids"].tolist() == inputs["input_ids"].tolist()
    assert np.abs(a - our_logits(back, inputs)).max() < 1e-4
    assert np.abs(a - our_logits(before, inputs)).max() > 1e-2  # training did change the model


def test_frozen_vision_tower_uses_the_feature_cache(hf_dir, next_data, tmp_path):
    """Without --vision-tower-lr the tower stays as it was, and cached crop features train alike."""
    train_next(hf_dir, next_data, tmp_path / "plain", iters=3)
    train_next(hf_dir, next_data, tmp_path / "cached", iters=3, cache_features=str(tmp_path / "cache"))
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 8
    for name in ("adapters.safetensors", "projector.safetensors"):
        a, b = (mx.load(str(tmp_path / run / name)) for run in ("plain", "cached"))
        for k in a:
            assert np.allclose(np.array(a[k]), np.array(b[k]), atol=1e-5), k
    assert not (tmp_path / "plain" / "vision_tower.safetensors").exists()
    with pytest.raises(mlx_llava.LlavaError, match="frozen vision tower"):
        train_next(hf_dir, next_data, tmp_path / "x", vision_tower_lr=1e-5, cache_features=str(tmp_path / "cache"))


# ---------------------------------------------------------------- chat


def test_chat_keeps_the_cache_and_verbose_shows_the_visual_tokens(hf_dir, tmp_path):
    """A second turn about a 1.6 image reuses its visual tokens and the cache;
    `generate --verbose` says how many visual tokens the image became."""
    import subprocess
    import sys

    from mlx_lm.utils import common_prefix_len

    model, processor = mlx_llava.load(hf_dir)
    path = tmp_path / "wide.png"
    noise(IMAGES["landscape"]).save(path)
    chat = mlx_llava.Chat(model, processor, image=path)
    calls = []
    encode = model.encode_images
    model.encode_images = lambda pixels, *sizes: calls.append(pixels.shape) or encode(pixels, *sizes)
    try:
        list(chat.ask("What is in the image?", max_tokens=4))
        history = list(chat.tokens)
        list(chat.ask("And the colour?", max_tokens=4))
    finally:
        del model.encode_images
    assert len(calls) == 1 and calls[0][0] == processor.anyres.crops((30, 50))
    count = processor.visual_tokens((30, 50))
    assert chat.features[0].shape[0] == count and history.count(VOCAB) == count
    assert common_prefix_len(history, chat.tokens) >= history.index(VOCAB) + count

    result = subprocess.run([sys.executable, "-m", "mlx_llava.cli", "generate", "--model", str(hf_dir),
                             "--image", str(path), "-p", "What is it?", "--max-tokens", "2", "--verbose"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{count} visual tokens" in result.stderr and "50x30 image" in result.stderr


def greedy_fresh(model, processor, ids, images, n):
    """Greedy tokens of one uncached pass over `ids` with these images."""
    from mlx_lm.generate import generate_step

    pixels, sizes = processor.image_inputs(images)
    embeds = model.embed(mx.array([ids]), pixels, image_sizes=sizes)[0]
    return [t for t, _ in generate_step(mx.array(ids), model.language_model, input_embeddings=embeds,
                                        max_tokens=n)]


def test_chat_with_images_of_different_token_counts_and_a_prompt_cache_file(hf_dir, tmp_path):
    """A second image (another size, so another visual token count) in the
    second turn: only it goes through the vision tower, and the turn's
    tokens equal an uncached pass over the same ids. A prompt cache file of
    the first turn, reloaded, gives the first turn's tokens again."""
    model, processor = mlx_llava.load(hf_dir)
    wide, tall = noise(IMAGES["landscape"]), noise(IMAGES["portrait"], seed=1)
    assert processor.visual_tokens((30, 50)) != processor.visual_tokens((45, 20))
    no_eos = {processor.tokenizer.eos_token_id: -float("inf")}
    chat = mlx_llava.Chat(model, processor, image=wide)
    first = [r.token for r in chat.ask("What is it?", max_tokens=4, logit_bias=no_eos)]
    assert first == greedy_fresh(model, processor, chat.prompt_ids, [wide], 4)
    chat.save_prompt_cache(tmp_path / "wide.safetensors")
    calls = []
    encode = model.encode_images
    model.encode_images = lambda pixels, *sizes: calls.append(pixels.shape[0]) or encode(pixels, *sizes)
    try:
        second = [r.token for r in chat.ask("<image>\nAnd this one?", image=tall, max_tokens=4, logit_bias=no_eos)]
    finally:
        del model.encode_images
    assert calls == [processor.anyres.crops((45, 20))]
    assert second == greedy_fresh(model, processor, chat.prompt_ids, [wide, tall], 4)

    again = mlx_llava.Chat(model, processor, image=wide)
    again.load_prompt_cache(tmp_path / "wide.safetensors")
    replay = list(again.ask("What is it?", max_tokens=4, logit_bias=no_eos))
    assert [r.token for r in replay] == first and replay[-1].prompt_tokens == 1


@pytest.mark.parametrize("method", ["full", "qlora"])
def test_full_and_qlora_on_a_16_model(hf_dir, next_data, tmp_path, method):
    """Full fine-tuning (the vision tower too) writes a model that loads with
    its trained image_newline and vision tower; QLoRA trains on the 4-bit base."""
    kw = dict(vision_tower_lr=1e-3, learning_rate=1e-3, projector_lr=1e-3) if method == "full" else {}
    train_next(hf_dir, next_data, tmp_path, method=method, iters=3, **kw)
    losses = losses_of(tmp_path)
    assert all(np.isfinite(losses))
    before, _ = load_model(hf_dir)
    if method == "full":
        after, processor = mlx_llava.load(tmp_path / "model")
        assert processor.anyres == mlx_llava.load(hf_dir)[1].anyres
        old, new = dict(tree_flatten(before.parameters())), dict(tree_flatten(after.parameters()))
        moved = {k for k in old if not mx.array_equal(old[k], new[k])}
        assert "image_newline" in moved and any(k.startswith("vision_tower.") for k in moved)
    else:
        import mlx.nn as nn

        model, _ = mlx_llava.load(hf_dir, adapter_path=tmp_path)
        assert isinstance(model.language_model.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)


def test_batched_generation_equals_one_at_a_time(hf_dir, tmp_path):
    """mlx_llava.batch with a 1.6 model: images of different token counts in
    one vision-tower call, each prompt answered as alone (greedy)."""
    from mlx_llava.batch import Request, stream_batch

    model, processor = mlx_llava.load(hf_dir)
    paths = []
    for k, name in enumerate(["landscape", "portrait", "odd"]):
        paths.append(tmp_path / f"{name}.png")
        noise(IMAGES[name], seed=k).save(paths[-1])
    questions = ["What is it?", "Describe the picture.", "Which colour?"]
    expected = [[r.token for r in mlx_llava.stream_generate(model, processor, q, image=p, max_tokens=6)]
                for q, p in zip(questions, paths)]
    tokens = [[] for _ in questions]
    for r in stream_batch(model, processor, [Request.ask(q, image=p, max_tokens=6) for q, p in zip(questions, paths)], 3):
        tokens[r.uid].append(r.token)
    assert tokens == expected
