"""Training: what learns in each stage, resumability, data parallelism, fusing."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from PIL import Image

import mlx_llava
from mlx_llava.errors import LlavaError
from mlx_llava.train import TrainConfig, train
from mlx_llava.weights import load_model

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A few images of one coloured square each, with stage-1 and stage-2 records."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    stage1, stage2 = [], []
    for i, (name, rgb) in enumerate(list(COLOURS.items()) * 2):
        file = f"{name}{i}.png"
        image = Image.new("RGB", (28 + 4 * i, 28), (255, 255, 255))
        image.paste(rgb, (4, 4, 20, 20))
        image.save(root / "images" / file)
        stage1.append({"id": f"s1-{i}", "image": file, "conversations": [
            {"from": "human", "value": "Describe the image briefly.\n<image>"},
            {"from": "gpt", "value": f"A {name} square."}]})
        stage2.append({"id": f"s2-{i}", "image": file, "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the square?"},
            {"from": "gpt", "value": name},
            {"from": "human", "value": "Is it a circle?"},
            {"from": "gpt", "value": "No, it is a square."}]})
    stage2.append({"id": "text-only", "conversations": [
        {"from": "human", "value": "How many objects are there?"}, {"from": "gpt", "value": "three"}]})
    (root / "stage1.json").write_text(json.dumps(stage1))
    (root / "stage2.jsonl").write_text("\n".join(json.dumps(r) for r in stage2))
    return root


def params(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def run(model_dir, dataset, out, on_step=None, **kw):
    options = dict(stage=2, model=str(model_dir), data=str(dataset / "stage2.jsonl"),
                   image_folder=str(dataset / "images"), output=str(out), batch_size=4,
                   iters=4, learning_rate=1e-2, projector_lr=1e-2, lora_rank=4, lora_alpha=8,
                   warmup_ratio=0.0, save_every=100, seed=0, progress=False)
    options.update(kw)
    return train(TrainConfig(**options), on_step=on_step)


def changed(before, after):
    return {k for k in before if k in after and not np.array_equal(before[k], after[k])}


def test_stage1_trains_only_the_projector(model_dir, dataset, tmp_path):
    before = params(load_model(model_dir)[0])
    summary = run(model_dir, dataset, tmp_path, stage=1, data=str(dataset / "stage1.json"),
                  iters=30, learning_rate=2e-2, projector_lr=None)
    assert summary["final_loss"] is not None
    losses = [json.loads(l)["loss"] for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert np.mean(losses[-5:]) < 0.85 * losses[0]  # the first loss is before any update
    after = params(load_model(tmp_path / "model")[0])
    moved = changed(before, after)
    assert moved and all(k.startswith("multi_modal_projector.") for k in moved)
    assert moved == {k for k in before if k.startswith("multi_modal_projector.")}
    assert (tmp_path / "projector.safetensors").exists() and (tmp_path / "loss.png").exists()


def test_stage2_lora_trains_adapters_and_projector(model_dir, dataset, tmp_path):
    model, _ = load_model(model_dir)
    before = params(model)
    run(model_dir, dataset, tmp_path, method="lora", lora_dropout=0.0)
    adapters = mx.load(str(tmp_path / "adapters.safetensors"))
    assert adapters and all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for k in adapters)
    assert all(float(mx.abs(v).sum()) > 0 for k, v in adapters.items() if k.endswith("lora_b"))
    fused, _ = mlx_llava.load(model_dir, adapter_path=tmp_path)
    after = {k.replace(".linear.", "."): v for k, v in params(fused).items()}
    moved = changed(before, after)
    assert moved == {k for k in before if k.startswith("multi_modal_projector.")}


def test_stage2_full_never_touches_the_vision_tower(model_dir, dataset, tmp_path):
    before = params(load_model(model_dir)[0])
    run(model_dir, dataset, tmp_path, method="full", learning_rate=1e-3, projector_lr=1e-3)
    after = params(load_model(tmp_path / "model")[0])
    moved = changed(before, after)
    assert not any(k.startswith("vision_tower.") for k in moved)
    assert any(k.startswith("language_model.model.layers.") for k in moved)
    assert any(k.startswith("multi_modal_projector.") for k in moved)


def test_qlora_trains_on_a_quantized_base(model_dir, dataset, tmp_path):
    run(model_dir, dataset, tmp_path, method="qlora", iters=6, lora_dropout=0.0)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["quantized_base"]["bits"] == 4
    model, _ = mlx_llava.load(model_dir, adapter_path=tmp_path)
    q_proj = model.language_model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.linear, nn.QuantizedLinear)
    losses = [json.loads(l)["loss"] for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


class Stop(Exception):
    pass


def test_muon_updates_the_weight_matrices_and_adamw_the_rest(model_dir):
    from mlx_llava.train.setup import make_optimizer, setup_trainable

    model, _ = load_model(model_dir)
    cfg = TrainConfig(stage=2, model=str(model_dir), data="x", output="y", method="full",
                      optimizer="muon", muon_lr=3e-3, learning_rate=1e-4, projector_lr=1e-4)
    setup_trainable(model, cfg)
    optimizer = make_optimizer(cfg, total=10)
    optimizer.init(model.trainable_parameters())
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, optim.Muon) and isinstance(adamw, optim.AdamW)
    by_muon = {k for k, _ in tree_flatten(muon.state) if k.endswith(".v")}
    by_adamw = {k for k, _ in tree_flatten(adamw.state) if k.endswith(".m")}
    assert "language_model.model.layers.0.self_attn.q_proj.weight.v" in by_muon
    assert "language_model.model.layers.0.mlp.down_proj.weight.v" in by_muon
    assert "multi_modal_projector.linear_1.weight.v" in by_muon
    assert "language_model.model.embed_tokens.weight.m" in by_adamw
    assert "language_model.model.norm.weight.m" in by_adamw
    assert "multi_modal_projector.linear_1.bias.m" in by_adamw
    assert not any("embed" in k or "norm" in k or k.endswith("bias.v") for k in by_muon)
    assert not {k[:-2] for k in by_muon} & {k[:-2] for k in by_adamw}


def test_muon_trains_and_resumes_like_an_uninterrupted_run(model_dir, dataset, tmp_path):
    common = dict(method="full", optimizer="muon", muon_lr=2e-2, learning_rate=1e-3, projector_lr=1e-3,
                  iters=6, save_every=2)
    run(model_dir, dataset, tmp_path / "straight", **common)
    losses = [json.loads(l)["loss"] for l in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(losses)) and np.mean(losses[-2:]) < losses[0]

    def crash(step, loss):
        if step == 3:
            raise Stop()

    with pytest.raises(Stop):
        run(model_dir, dataset, tmp_path / "resumed", on_step=crash, **common)
    run(model_dir, dataset, tmp_path / "resumed", resume=True, **common)
    a = params(load_model(tmp_path / "straight" / "model")[0])
    b = params(load_model(tmp_path / "resumed" / "model")[0])
    for k in a:
        assert np.allclose(a[k], b[k], atol=1e-5), k


def test_unknown_optimizer_is_one_line_error(model_dir, dataset, tmp_path):
    with pytest.raises(LlavaError, match="unknown optimizer 'sgd'"):
        run(model_dir, dataset, tmp_path, optimizer="sgd")


def test_kill_and_resume_matches_an_uninterrupted_run(model_dir, dataset, tmp_path):
    common = dict(method="lora", iters=6, save_every=2, lora_dropout=0.1)
    run(model_dir, dataset, tmp_path / "straight", **common)

    def crash(step, loss):
        if step == 4:
            raise Stop()

    with pytest.raises(Stop):
        run(model_dir, dataset, tmp_path / "resumed", on_step=crash, **common)
    assert not (tmp_path / "resumed" / "adapters.safetensors").exists()
    run(model_dir, dataset, tmp_path / "resumed", resume=True, **common)
    a = mx.load(str(tmp_path / "straight" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "resumed" / "adapters.safetensors"))
    for k in a:
        assert np.allclose(np.array(a[k]), np.array(b[k]), atol=1e-6), k
    log = [json.loads(l)["step"] for l in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5, 6]
    assert len(list((tmp_path / "resumed" / "checkpoints").iterdir())) <= 2


def test_fused_model_answers_like_model_plus_adapters(model_dir, dataset, tmp_path):
    run(model_dir, dataset, tmp_path / "lora", method="lora", lora_dropout=0.0)
    from mlx_llava.adapters import fuse

    fuse(model_dir, tmp_path / "lora", tmp_path / "fused")
    with_adapters, processor = mlx_llava.load(model_dir, adapter_path=tmp_path / "lora")
    fused, _ = mlx_llava.load(tmp_path / "fused")
    inputs = processor("USER: <image>\nWhat color is the square? ASSISTANT:", [dataset / "images" / "red0.png"])
    a = with_adapters(inputs["input_ids"], inputs["pixel_values"])
    b = fused(inputs["input_ids"], inputs["pixel_values"])
    assert np.abs(np.array(a) - np.array(b)).max() < 1e-4
    question = "What color is the square?"
    image = dataset / "images" / "red0.png"
    assert (mlx_llava.generate(with_adapters, processor, question, image=image, max_tokens=8)
            == mlx_llava.generate(fused, processor, question, image=image, max_tokens=8))


def test_feature_cache_gives_the_same_run(model_dir, dataset, tmp_path):
    kw = dict(stage=1, data=str(dataset / "stage1.json"), iters=3, projector_lr=None)
    run(model_dir, dataset, tmp_path / "plain", **kw)
    run(model_dir, dataset, tmp_path / "cached", cache_features=str(tmp_path / "cache"), **kw)
    cached = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(cached) == 8
    stamps = {p: p.stat().st_mtime_ns for p in cached}
    run(model_dir, dataset, tmp_path / "again", cache_features=str(tmp_path / "cache"), **kw)
    assert {p: p.stat().st_mtime_ns for p in cached} == stamps  # reused, not recomputed
    a = mx.load(str(tmp_path / "plain" / "projector.safetensors"))
    for other in ("cached", "again"):
        b = mx.load(str(tmp_path / other / "projector.safetensors"))
        for k in a:
            assert np.allclose(np.array(a[k]), np.array(b[k]), atol=1e-6)


def test_bad_records_are_skipped_and_reported(model_dir, dataset, tmp_path):
    records = [json.loads(l) for l in (dataset / "stage2.jsonl").read_text().splitlines()]
    records += [
        {"id": "no-image-file", "image": "missing.png", "conversations": records[0]["conversations"]},
        {"id": "no-answer", "conversations": [{"from": "human", "value": "hi"}]},
        {"id": "broken", "conversations": "nope"},
    ]
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "truncated.png").write_bytes((dataset / "images" / "red0.png").read_bytes()[:60])
    records.append({"id": "truncated-image", "image": "truncated.png", "conversations": records[0]["conversations"]})
    lines = [json.dumps(r) for r in records] + ["{not json"]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines))
    for r in records[:8]:
        (tmp_path / "images" / r["image"]).write_bytes((dataset / "images" / r["image"]).read_bytes())
    summary = run(model_dir, dataset, tmp_path / "out", data=str(data), image_folder=str(tmp_path / "images"),
                  method="lora", iters=3, max_length=120)
    skipped = dict(summary["skipped"])
    assert {"no-image-file", "no-answer", "broken", "line 14", "truncated-image"} <= set(skipped)
    assert "image not found" in skipped["no-image-file"]
    assert summary["truncated"] > 0


def test_config_errors(model_dir, dataset, tmp_path):
    with pytest.raises(LlavaError, match="fewer than one global batch"):
        run(model_dir, dataset, tmp_path, batch_size=64)
    with pytest.raises(LlavaError, match="--grad-accum 3"):
        run(model_dir, dataset, tmp_path, grad_accum=3)
    with pytest.raises(LlavaError, match="either --model"):
        TrainConfig(stage=1, data="x", output="y")
    (tmp_path / "bad.yaml").write_text("stage: 1\nlearning_rat: 3\n")
    with pytest.raises(LlavaError, match="learning_rat"):
        TrainConfig.from_file(tmp_path / "bad.yaml", data="x", output="y", model="m")


DIST = """
import sys
from mlx_llava.train import TrainConfig, train
model, data, images, out, accum = sys.argv[1:6]
train(TrainConfig(stage=2, model=model, data=data, image_folder=images, output=out, batch_size=4,
                  grad_accum=int(accum), iters=3, learning_rate=1e-2, projector_lr=1e-2, lora_rank=4,
                  lora_alpha=8, lora_dropout=0.0, warmup_ratio=0.0, seed=0, progress=False))
"""


def test_two_processes_match_one(model_dir, dataset, tmp_path):
    """Data parallel over loopback (mlx.launch --backend ring -n 2) = one process, same global batch."""
    script = tmp_path / "dist.py"
    script.write_text(DIST)
    args = [str(model_dir), str(dataset / "stage2.jsonl"), str(dataset / "images")]
    launch = Path(sys.executable).with_name("mlx.launch")
    subprocess.run([sys.executable, script, *args, tmp_path / "one", "2"], check=True, timeout=600)
    result = subprocess.run([launch, "--backend", "ring", "-n", "2", "--python", sys.executable, script,
                             *args, tmp_path / "two", "1"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    a = mx.load(str(tmp_path / "one" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "two" / "adapters.safetensors"))
    for k in a:
        # The same sums in another order (two halves of the batch, then all_sum), amplified by
        # three optimizer steps: about 1e-5 on weights of about 0.16 with MKL under MLX, half
        # that with OpenBLAS. A lost or doubled gradient would be off by far more.
        assert np.allclose(np.array(a[k]), np.array(b[k]), atol=5e-5), k
    # the step's counts are summed over the processes too: same loss, same target and read tokens
    logs = [[json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("one", "two")]
    assert len(logs[0]) == len(logs[1]) == 3
    for x, y in zip(*logs):
        assert abs(x["loss"] - y["loss"]) < 1e-4 * abs(x["loss"])
        assert x["trained_tokens"] == y["trained_tokens"] > 0
        ratio = x["tokens_per_second"] / x["samples_per_second"]
        assert abs(ratio - y["tokens_per_second"] / y["samples_per_second"]) < 0.01 * ratio  # tokens read per step


def test_prepare_tokenizes_like_build_targets_alone(model_dir, dataset, tmp_path):
    """prepare() remembers what it tokenized (a dataset repeats its questions);
    every sample must still get exactly what build_targets gives it alone, and
    a remembered encoding must not change when a caller extends its list."""
    from mlx_llava.conversation import build_targets
    from mlx_llava.train.data import MemoTokenizer, prepare

    model, config = load_model(model_dir)
    processor = mlx_llava.processor.Processor.from_dir(model_dir, config)
    path = dataset / "stage2.jsonl"
    twice = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] * 2
    doubled = tmp_path / "doubled.json"
    doubled.write_text(json.dumps(twice))
    data = prepare(doubled, processor.tokenizer, processor.conv_mode, processor.image_token_index,
                   processor.num_visual_tokens, str(dataset / "images"), 2048)
    assert len(data.examples) == len(twice)
    for record, example in zip(twice, data.examples):
        turns = [dict(t) for t in record["conversations"]]
        if example.image is None:
            turns[0]["value"] = turns[0]["value"].replace("<image>", "").strip()
        ids, labels = build_targets(processor.tokenizer, turns, processor.conv_mode,
                                    processor.image_token_index, processor.num_visual_tokens if example.image else 1)
        assert (example.input_ids, example.labels) == (ids, labels)
    memo = MemoTokenizer(processor.tokenizer)
    first = memo.encode("a red circle")
    first += [7, 7]
    assert memo.encode("a red circle") == list(processor.tokenizer.encode("a red circle"))


def test_loss_on_target_positions_matches_full_logits(model_dir, dataset, monkeypatch):
    """The loss computes logits only where there is a target; it must equal the
    loss (and gradients) over full logits, masked."""
    from mlx_llava.train import trainer
    from mlx_llava.train.data import prepare

    model, config = load_model(model_dir)
    processor = mlx_llava.processor.Processor.from_dir(model_dir, config)
    data = prepare(dataset / "stage2.jsonl", processor.tokenizer, processor.conv_mode,
                   processor.image_token_index, processor.num_visual_tokens, str(dataset / "images"), 2048)
    batch = trainer.make_batch(model, processor, data, [0, 1, 8])  # two image examples + the text-only one
    grad = nn.value_and_grad(model, trainer.loss_fn)
    (loss, n), g = grad(model, *batch)
    monkeypatch.setattr(trainer, "PLAIN_HEAD", set())
    (full_loss, full_n), full_g = grad(model, *batch)
    assert n.item() == full_n.item() > 0
    assert abs(loss.item() - full_loss.item()) < 1e-4 * abs(full_loss.item())
    for (k, a), (_, b) in zip(tree_flatten(g), tree_flatten(full_g)):
        assert np.allclose(np.array(a), np.array(b), atol=1e-5), k


def test_group_by_length_batches_like_lengths_and_covers_the_epoch():
    from mlx_llava.train.data import epoch_batches

    lengths = list(np.random.default_rng(0).choice([20, 60, 120], 1000))
    spread = lambda batches: np.mean([np.ptp([lengths[i] for m in b for i in m]) for b in batches])  # noqa: E731
    plain = epoch_batches(lengths, 8, 1, seed=0, epoch=0)
    grouped = epoch_batches(lengths, 8, 1, seed=0, epoch=0, group_by_length=True)
    assert sorted(i for b in grouped for m in b for i in m) == sorted(i for b in plain for m in b for i in m)
    assert len({i for b in grouped for m in b for i in m}) == 1000  # each sample once
    assert spread(grouped) < 0.2 * spread(plain)
    firsts = [lengths[b[0][0]] for b in grouped]
    assert len(set(firsts[:20])) > 1  # the grouped batches are shuffled, not sorted
    assert grouped == epoch_batches(lengths, 8, 1, seed=0, epoch=0, group_by_length=True)
    assert grouped != epoch_batches(lengths, 8, 1, seed=0, epoch=1, group_by_length=True)


def test_image_placeholder_stays_where_the_record_puts_it(model_dir, dataset, tmp_path):
    """<image> in a later human turn is spliced there (as the original does);
    a record with an image but no <image> trains as text, its image unseen (as
    the original does), and is reported; two placeholders for one image is skipped."""
    from mlx_llava.processor import Processor
    from mlx_llava.train.data import prepare

    model, config = load_model(model_dir)
    processor = Processor.from_dir(model_dir, config)
    convo = [{"from": "human", "value": "What is this?"}, {"from": "gpt", "value": "A square."},
             {"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": "red"}]
    records = [
        {"id": "second-turn", "image": "red0.png", "conversations": convo},
        {"id": "no-placeholder", "image": "red0.png", "conversations": [
            {"from": "human", "value": "What color is the square?"}, {"from": "gpt", "value": "red"}]},
        {"id": "two", "image": "red0.png", "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhat?"}, {"from": "gpt", "value": "red"}]},
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    data = prepare(path, processor.encoder, processor.train_conv_mode, processor.image_token_index,
                   processor.num_visual_tokens, str(dataset / "images"), 2048)
    examples = {e.id: e for e in data.examples}
    second = examples["second-turn"]
    n = processor.num_visual_tokens
    image = processor.image_token_index
    assert second.input_ids.count(image) == n and second.image is not None
    # the image lies after the first answer, not in the first turn
    first_answer = processor.encoder.encode("A square.", add_special_tokens=False)
    start = second.input_ids.index(image)
    assert any(second.input_ids[i:i + len(first_answer)] == first_answer for i in range(start))
    assert examples["no-placeholder"].image is None and image not in examples["no-placeholder"].input_ids
    assert data.unplaced == ["no-placeholder"]
    assert dict(data.skipped)["two"].startswith("2 <image> placeholders")
    # and the batch trains: the image's tokens meet its visual tokens
    summary = run(model_dir, dataset, tmp_path / "out", data=str(path), batch_size=2, iters=1)
    assert summary["unplaced"] == ["no-placeholder"] and summary["final_loss"] > 0


def test_stage2_trains_with_the_template_the_model_was_trained_with(model_dir, dataset, tmp_path):
    """A model that answers in llava_v1 (the original CLI's choice for LLaVA-1.5)
    was instruction-tuned in vicuna_v1: stage 2 defaults to that; --conv-mode overrides."""
    config = json.loads((model_dir / "config.json").read_text())
    assert mlx_llava.load(model_dir)[1].conv_mode == config.get("conv_mode", "llava_v1") == "llava_v1"
    assert run(model_dir, dataset, tmp_path / "a", iters=1)["conv_mode"] == "vicuna_v1"
    assert run(model_dir, dataset, tmp_path / "b", iters=1, conv_mode="llava_v1")["conv_mode"] == "llava_v1"


def test_compiled_step_trains_like_the_plain_one(model_dir, dataset, tmp_path):
    """mx.compile changes nothing but speed: the same losses and weights, step by step."""
    logs = {}
    for compiled in (True, False):
        run(model_dir, dataset, tmp_path / str(compiled), compile=compiled, lora_dropout=0.1)
        logs[compiled] = [json.loads(line)["loss"] for line in (tmp_path / str(compiled) / "log.jsonl").read_text().splitlines()]
    assert len(logs[True]) == 4 and np.allclose(logs[True], logs[False], rtol=1e-4, atol=1e-5)
    a = mx.load(str(tmp_path / "True" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "False" / "adapters.safetensors"))
    for k in a:
        # The same sums in another order (two halves of the batch, then all_sum), amplified by
        # three optimizer steps: about 1e-5 on weights of about 0.16 with MKL under MLX, half
        # that with OpenBLAS. A lost or doubled gradient would be off by far more.
        assert np.allclose(np.array(a[k]), np.array(b[k]), atol=5e-5), k


def test_stage_table_is_the_one_the_readme_shows():
    from mlx_llava.train.config import stage_table

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert stage_table() in readme
