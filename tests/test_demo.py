"""The shipped demo model, and the recipe that rebuilds it."""

import json
import subprocess
import sys

import mlx_llava
from mlx_llava.demo import HERE, Recipe, build, heldout_dir, install_model
from mlx_llava.demo import evaluate_heldout
from mlx_llava.eval import load_questions
from mlx_llava.weights import default_model

REPORTED = json.loads((HERE / "results.json").read_text())


def test_shipped_model_answers_the_heldout_sample_at_the_reported_accuracy():
    """Loads from the installed package (no network) and scores what the README says."""
    model, processor = mlx_llava.load(default_model())
    questions = load_questions(heldout_dir() / "questions.json")
    result = evaluate_heldout(model, processor, questions, heldout_dir() / "images")
    reported = REPORTED["shipped_sample"]
    assert result["count"] == reported["count"] == len(questions)
    # Greedy decoding is deterministic; allow one answer of slack for other
    # BLAS builds, whose float rounding can flip a near tie.
    assert abs(result["accuracy"] - reported["accuracy"]) <= 1 / result["count"] + 1e-9
    for kind, accuracy in reported["by_kind"].items():
        asked = sum(q["kind"] == kind for q in questions)
        assert abs(result["by_kind"][kind] - accuracy) <= 1 / asked + 1e-9, kind


def test_chat_runs_the_demo_model_without_a_model_flag():
    image = heldout_dir() / "images" / sorted(p.name for p in (heldout_dir() / "images").iterdir())[0]
    question = load_questions(heldout_dir() / "questions.json")[0]
    result = subprocess.run([sys.executable, "-m", "mlx_llava.cli", "chat", str(image)],
                            input="What shapes are in the image?\n/quit\n", capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert ">> " in result.stdout and len(result.stdout.split(">> ")[1].strip()) > 0
    assert question  # the sample is not empty


def test_eval_command_prints_the_table(tmp_path):
    """`mlx-llava eval` (the quick check) and the benchmark path, `eval answer` then
    `eval score heldout`, give the same figures: the shipped model's reported ones."""
    def cli(*args):
        result = subprocess.run([sys.executable, "-m", "mlx_llava.cli", "eval", *args], capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        return result.stdout

    quick = cli()
    assert "| demo |" in quick and "overall" in quick
    row = next(line for line in quick.splitlines() if line.startswith("| demo |"))
    cli("answer", "--answers", str(tmp_path / "demo.jsonl"), "--batch-size", "16")
    scored = cli("score", "heldout", "--answers", str(tmp_path / "demo.jsonl"))
    assert row in scored
    summary = json.loads((tmp_path / "demo.score.json").read_text())
    reported = REPORTED["shipped_sample"]
    assert summary["count"] == reported["count"]
    assert abs(summary["accuracy"] - reported["accuracy"]) <= 1 / summary["count"] + 1e-9
    assert row.endswith(f"| {100 * summary['accuracy']:.1f} |")


def test_recipe_runs_end_to_end_at_toy_scale(tmp_path):
    """The same code path as `mlx-llava demo train`, with a toy budget."""
    recipe = Recipe(n_train=48, n_test=4, vocab_size=400)
    recipe.language_model.update(steps=2, batch_size=8, hidden_size=64, intermediate_size=128)
    recipe.clip.update(steps=2, batch_size=8, hidden_size=32, intermediate_size=64)
    recipe.stage1.update(batch_size=16)
    recipe.stage2.update(batch_size=16, epochs=1)
    recipe.short_answers.update(per_scene=2)
    summary = build(tmp_path, recipe, variants=("full+short", "conversation", "stage1"), log=lambda *a: None)
    assert set(summary["results"]) == {"full+short", "conversation", "stage1"}
    for variant in ("full", "full+short", "conversation"):
        assert (tmp_path / f"stage2-{variant}" / "model" / "config.json").exists()
    data = [json.loads(l) for l in (tmp_path / "stage2-conversation" / "log.jsonl").read_text().splitlines()]
    assert data, "stage 2 trained"
    # The shipped variant: one pass over the short-answer data and a quarter of the mixture,
    # from the full mixture's model.
    passed_config = json.loads((tmp_path / "stage2-full+short" / "train_config.json").read_text())
    assert passed_config["model"] == str(tmp_path / "stage2-full" / "model")
    assert passed_config["data"] == str(tmp_path / "short-full+short.json") and passed_config["batch_size"] == 16
    passed = json.loads((tmp_path / "short-full+short.json").read_text())
    short = json.loads((tmp_path / "data" / "short_answers.json").read_text())
    assert len(short) == 48 * 2
    assert sorted(s["id"] for s in passed if s["type"] == "short") == sorted(s["id"] for s in short)
    mixed = [s for s in passed if s["type"] != "short"]
    assert len(mixed) == 48 * 3 // 4 and {s["type"] for s in mixed} == {"conversation", "detail", "reasoning"}
    steps = (tmp_path / "stage2-full+short" / "log.jsonl").read_text().splitlines()
    assert len(steps) == len(passed) // 16
    # Then the further passes, each from the one before, over questions drawn afresh from the
    # same scenes; the last leans toward relations and counts, in larger batches.
    for k, before in ((2, "stage2-full+short"), (3, "stage2-full+short-2")):
        config = json.loads((tmp_path / f"stage2-full+short-{k}" / "train_config.json").read_text())
        assert config["model"] == str(tmp_path / before / "model")
        assert config["batch_size"] == recipe.more_passes[k - 2]["batch_size"]
        fresh = [s for s in json.loads((tmp_path / f"short-full+short-{k}.json").read_text()) if s["type"] == "short"]
        assert len(fresh) == len(short) and fresh != short
    asked = [t["value"] for s in fresh for t in s["conversations"][::2]]
    relations, counts = sum(q.startswith(("Is the", "Which object")) for q in asked), sum("How many" in q for q in asked)
    colours = sum("color" in q for q in asked)
    assert relations > 2 * colours and counts > colours
    # The package gets the last pass's model.
    installed = install_model(tmp_path, summary, package_dir=tmp_path / "package")
    assert (installed / "model.safetensors").read_bytes() == (
        tmp_path / "stage2-full+short-3" / "model" / "model.safetensors").read_bytes()
    conversation_only = json.loads((tmp_path / "instruct-conversation.json").read_text())
    assert conversation_only and {s["type"] for s in conversation_only} == {"conversation"}
    # The CLIP starts with position embeddings as loud as patch content (MLX's default is ~0.09).
    from mlx_llava.weights import load_weights

    position = load_weights(tmp_path / "clip")["vision_model.embeddings.position_embedding.weight"]
    assert 0.5 < position.std().item() < 2
    # A rerun reuses every finished step.
    again = build(tmp_path, recipe, variants=("full+short",), log=lambda *a: None)
    assert not any(k in again["timings"] for k in ("language_model", "clip", "stage1", "stage2-full",
                                                    "stage2-full+short"))


def test_region_phrases_name_what_and_where(tmp_path):
    from mlx_llava.datagen import read_coco
    from mlx_llava.demo.world import make_scenes, write_coco
    from mlx_llava.demo.recipe import region_phrases

    scenes = make_scenes(6, seed=3, image_size=72)
    write_coco(scenes, tmp_path)
    records = list(read_coco(tmp_path / "captions.json", tmp_path / "instances.json"))
    for scene, record in zip(scenes, records, strict=True):
        phrases = region_phrases(record)
        assert [p for _, _, p in phrases] == [f"{o.colour} {o.shape} {o.position}" for o in scene.objects]
        assert [(x, y) for x, y, _ in phrases] == [o.center for o in scene.objects]


def test_tokenizer_makes_fixed_phrases_one_token_and_round_trips(tmp_path):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from mlx_llava.conversation import get_template, render
    from mlx_llava.demo.rules import SHORT_ANSWER
    from mlx_llava.demo.tokenizer import train_tokenizer

    system = get_template("vicuna_v1").system
    texts = [render([{"role": "user", "content": f"What color is the {s}?\n{SHORT_ANSWER}"},
                     {"role": "assistant", "content": c}], "vicuna_v1", add_generation_prompt=False)
             for s in ("circle", "star", "square", "triangle") for c in ("red", "blue", "green")] * 20
    words = load_tokenizer(train_tokenizer(texts, 600, tmp_path / "words"))
    phrases = load_tokenizer(train_tokenizer(texts, 600, tmp_path / "phrases", phrases=(system, SHORT_ANSWER)))
    pieces = phrases.convert_ids_to_tokens(phrases.encode(texts[0]))
    assert "▁" + system.replace(" ", "▁") in pieces, pieces
    assert SHORT_ANSWER.replace(" ", "▁") in pieces, pieces
    others = [p for p in pieces if "single" not in p and "curious" not in p]
    assert not any("▁" in p[1:] for p in others), others  # elsewhere merges stay within words
    assert len(pieces) < len(words.encode(texts[0])) / 2
    for text in (f"What color is the star?\n{SHORT_ANSWER}", "Where is the red cross?  Unseen wörds, 42!"):
        ids = phrases.encode(text, add_special_tokens=False)
        assert phrases.decode(ids) == text
        detok = phrases.detokenizer  # mlx-lm's streaming detokenizer, as chat uses it
        detok.reset()
        for i in ids:
            detok.add_token(i)
        detok.finalize()
        assert detok.text == text
    assert phrases.convert_tokens_to_ids("<image>") == len(phrases._tokenizer) - 1
