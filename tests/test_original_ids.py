"""Prompt ids and training targets equal the original LLaVA's, token for token.

The original tokenizes with transformers 4.37's slow sentencepiece
LlamaTokenizer; converted models carry a fast one. The expected ids come from
tests/reference_llava.py (the slow tokenizer and the original's
tokenizer_image_token / preprocess_* restated on the sentencepiece model the
tests train); ours come from a tokenizer folder made by `convert` and read
the way `mlx_llava.load` reads it. Both `legacy` settings.
"""

import json
import shutil
from pathlib import Path

import pytest

import reference_llava as ref
from mlx_llava.conversation import IMAGE_PLACEHOLDER, build_targets, render, tokenize
from mlx_llava.convert import files
from mlx_llava.processor import Processor, tokenizer_legacy

HUMAN_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
USER_SYSTEM = HUMAN_SYSTEM.replace("human", "user")
LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)
CONFIG = {"text_config": {"eos_token_id": 2, "max_position_embeddings": 256},
          "vision_config": {"image_size": 28, "patch_size": 7}, "image_token_index": 400}


def source_folder(tokenizer_dir, root: Path, legacy):
    """A tokenizer as liuhaotian's repositories ship it: tokenizer.model and a config."""
    folder = root / f"source-{legacy}"
    folder.mkdir()
    shutil.copy(Path(tokenizer_dir) / "_spm" / "tokenizer.model", folder / "tokenizer.model")
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 2048}
    if legacy is not None:
        config["legacy"] = legacy
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def make_pair(tokenizer_dir, root, legacy, added=()):
    """(our processor on a converted tokenizer, the original's slow tokenizer);
    `added`: special tokens the source tokenizer has (Yi's ChatML markers)."""
    source = source_folder(tokenizer_dir, root, legacy)
    out = root / "converted"
    out.mkdir()
    files.save_tokenizer(files.load_tokenizer(source, list(added)), out, source)
    processor = Processor.from_dir(out, CONFIG)
    legacy = True if legacy is None else legacy  # transformers 4's default
    slow = ref.SlowLlamaTokenizer(source / "tokenizer.model", legacy, added)
    return processor, slow


@pytest.fixture(scope="module", params=[True, False, None], ids=["legacy", "non-legacy", "legacy-unset"])
def pair(request, tokenizer_dir, tmp_path_factory):
    return make_pair(tokenizer_dir, tmp_path_factory.mktemp("tok"), request.param)


@pytest.fixture(scope="module", params=[True, False], ids=["legacy", "non-legacy"])
def chatml_pair(request, tokenizer_dir, tmp_path_factory):
    """As LLaVA-1.6-34b's Yi tokenizer: <|im_start|> and <|im_end|> are special tokens."""
    return make_pair(tokenizer_dir, tmp_path_factory.mktemp("chatml"), request.param, ("<|im_start|>", "<|im_end|>"))


def test_converted_tokenizer_keeps_legacy(pair, tmp_path):
    processor, slow = pair
    assert processor.encoder.slow_legacy is slow.legacy
    processor.save(tmp_path)  # a saved model (fuse, train) keeps it too
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["legacy"] is slow.legacy
    assert tokenizer_legacy(tmp_path) is slow.legacy


CONVERSATIONS = {
    "image only": [("<image>", "A red circle."), ("Where is the star?", "At the top left.")],
    "image in the second turn": [("What is this?", "Shapes."), ("<image>\nWhat colour?", "Red.")],
    "text only": [("What is in the image?", "A red circle."), ("And here?", "Nothing."), ("Sure?", "Yes.")],
    "spaces": [("<image>\n  What is it?", "  Two shapes on white. "), (" Where?", " Top.")],
}


def messages_of(turns, answer_last=True):
    out = []
    for q, a in turns:
        out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return out if answer_last else out[:-1]


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("mode", ["llava_v1", "vicuna_v1", "llava_llama_2", "mistral_instruct",
                                  "llava_v0", "chatml_direct", "plain"])
def test_prompt_ids(pair, mode, name):
    processor, slow = pair
    messages = messages_of(CONVERSATIONS[name], answer_last=False)
    prompt = render(messages, mode, processor.tokenizer)
    expected = ref.tokenizer_image_token(prompt, slow, ref.IMAGE_INDEX)
    assert tokenize(processor.encoder, prompt, ref.IMAGE_INDEX) == expected
    n = processor.num_visual_tokens
    assert processor.encode(prompt) == [
        x for i in expected for x in ([processor.image_token_index] * n if i == ref.IMAGE_INDEX else [i])]


def test_the_fast_tokenizer_alone_differs(pair):
    """What this guards against: a human turn that is only <image> leaves
    " ASSISTANT: ..." after the image, and the fast tokenizer drops its "▁"."""
    processor, slow = pair
    prompt = ref.prompt_two(USER_SYSTEM, [ref.multimodal("<image>"), "A red circle."])
    assert prompt.endswith("USER: <image> ASSISTANT: A red circle.</s>")
    expected = ref.tokenizer_image_token(prompt, slow, ref.IMAGE_INDEX)
    assert tokenize(processor.tokenizer, prompt, ref.IMAGE_INDEX) != expected
    assert tokenize(processor.encoder, prompt, ref.IMAGE_INDEX) == expected


def original_targets(mode, turns, slow):
    has_image = any(IMAGE_PLACEHOLDER in q for q, _ in turns)
    values = [ref.multimodal(v) if has_image else v for pair in turns for v in pair]
    if mode in ("llava_v1", "vicuna_v1"):
        system = HUMAN_SYSTEM if mode == "llava_v1" else USER_SYSTEM
        return ref.preprocess_v1(ref.prompt_two(system, values), slow, has_image)
    if mode == "chatml_direct":
        return ref.preprocess_mpt(ref.prompt_mpt("<|im_start|>system\nAnswer the questions.", values), slow,
                                  has_image)
    system = LLAMA_2_SYSTEM if mode == "llava_llama_2" else ""
    sep = "<s>" if mode == "llava_llama_2" else ""
    return ref.preprocess_llama_2(ref.prompt_llama_2(system, values, sep), slow, has_image)


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("mode", ["llava_v1", "vicuna_v1", "llava_llama_2", "mistral_instruct"])
def test_targets(pair, mode, name):
    processor, slow = pair
    turns = CONVERSATIONS[name]
    conversation = [{"from": f, "value": v} for q, a in turns for f, v in (("human", q), ("gpt", a))]
    ids, labels = build_targets(processor.encoder, conversation, mode, ref.IMAGE_INDEX)
    want_ids, want_labels = original_targets(mode, turns, slow)
    assert ids == want_ids
    assert labels == want_labels
    assert any(label != ref.IGNORE_INDEX for label in labels)  # a sample that trains


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_chatml_direct_targets(chatml_pair, name):
    """LLaVA-1.6-34b's template trains by preprocess_mpt's rules, token for
    token. Where its round lengths do not add up to the prompt's (the
    three-round text-only sample; with the non-legacy tokenizer, others too)
    the original masks the whole sample, and so do we."""
    processor, slow = chatml_pair
    turns = CONVERSATIONS[name]
    conversation = [{"from": f, "value": v} for q, a in turns for f, v in (("human", q), ("gpt", a))]
    ids, labels = build_targets(processor.encoder, conversation, "chatml_direct", ref.IMAGE_INDEX)
    assert (ids, labels) == original_targets("chatml_direct", turns, slow)
    if slow.legacy and name != "text only":  # these add up: a sample that trains
        assert any(label != ref.IGNORE_INDEX for label in labels)


@pytest.mark.parametrize("caption", ["There are two shapes.", "  Two leading spaces.", " One.", "1234 objects"])
def test_plain_targets(pair, caption):
    processor, slow = pair
    conversation = [{"from": "human", "value": "Describe the image briefly.\n<image>"},
                    {"from": "gpt", "value": caption}]
    assert build_targets(processor.encoder, conversation, "plain", ref.IMAGE_INDEX) == \
        ref.preprocess_plain(caption, slow)
