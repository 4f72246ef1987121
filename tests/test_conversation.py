"""Templates, tokens and training targets against the original LLaVA's rules.

Expected prompts are written out by hand from `Conversation.get_prompt`;
expected tokens come from a re-statement of `tokenizer_image_token`; expected
labels come from character offsets (which tokens cover the answer text), not
from the module's own arithmetic.
"""

import logging
import shutil
from pathlib import Path

import pytest

from mlx_llava.conversation import (
    CHAT_TEMPLATE,
    IGNORE_INDEX,
    TEMPLATES,
    build_targets,
    get_template,
    render,
    tokenize,
)
from mlx_llava.errors import LlavaError

IMAGE_ID = 400  # the fixture tokenizer's "<image>"
BOS, EOS = 1, 2

HUMAN_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
USER_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural language."
)

# Modeled on llava-hf's llava-1.5 template: role prefix, images first, then text.
LIST_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] != 'system' %}{{ m['role'].upper() + ': ' }}{% endif %}"
    "{% for c in m['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for c in m['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# A template that only knows string content.
STRING_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def wrapper(tokenizer_dir):
    from mlx_lm.tokenizer_utils import load

    return load(Path(tokenizer_dir))


@pytest.fixture(scope="module")
def templated_dir(tokenizer_dir, tmp_path_factory):
    """The fixture tokenizer with LIST_TEMPLATE as its chat template."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("templated")
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            shutil.copy(f, path / f.name)
    t = AutoTokenizer.from_pretrained(path)
    t.chat_template = LIST_TEMPLATE
    t.save_pretrained(path)
    return path


# ---------------------------------------------------------------- render

ONE = [{"role": "user", "content": "<image>\nWhat is in the image?"}]
MULTI = ONE + [
    {"role": "assistant", "content": "A red circle."},
    {"role": "user", "content": "Where is the star?"},
]
DONE = MULTI + [{"role": "assistant", "content": "At the top left."}]


@pytest.mark.parametrize("mode,system", [("llava_v1", HUMAN_SYSTEM), ("vicuna_v1", USER_SYSTEM)])
def test_render_two_style(mode, system):
    assert render(ONE, mode) == f"{system} USER: <image>\nWhat is in the image? ASSISTANT:"
    assert render(MULTI, mode) == (
        f"{system} USER: <image>\nWhat is in the image? ASSISTANT: A red circle.</s>"
        "USER: Where is the star? ASSISTANT:"
    )
    assert render(DONE, mode, add_generation_prompt=False) == (
        f"{system} USER: <image>\nWhat is in the image? ASSISTANT: A red circle.</s>"
        "USER: Where is the star? ASSISTANT: At the top left.</s>"
    )
    assert render([{"role": "system", "content": "Be brief."}] + ONE, mode) == (
        "Be brief. USER: <image>\nWhat is in the image? ASSISTANT:"
    )
    assert render([{"role": "user", "content": "Hello"}], mode, add_generation_prompt=False) == (
        f"{system} USER: Hello "
    )


@pytest.mark.parametrize("content,moved", [
    ("What is in the image?\n<image>", "<image>\nWhat is in the image?"),
    ("What is <image> in the image?", "<image>\nWhat is  in the image?"),  # inner spaces kept
    ("  <image>What is in the image?", "<image>\nWhat is in the image?"),
])
def test_render_moves_image_to_front(content, moved):
    got = render([{"role": "user", "content": content}], "llava_v1")
    assert got == f"{HUMAN_SYSTEM} USER: {moved} ASSISTANT:"


def test_render_only_first_message_moves():
    messages = MULTI[:2] + [{"role": "user", "content": "And here? <image>"}]
    assert render(messages, "vicuna_v1").endswith("</s>USER: And here? <image> ASSISTANT:")


def test_render_llama_2_styles():
    sys_block = f"<<SYS>>\n{LLAMA_2_SYSTEM}\n<</SYS>>\n\n"
    assert render(ONE, "llava_llama_2") == f"[INST] {sys_block}<image>\nWhat is in the image? [/INST]"
    assert render(MULTI, "llava_llama_2") == (
        f"[INST] {sys_block}<image>\nWhat is in the image? [/INST] A red circle. </s>"
        "<s>[INST] Where is the star? [/INST]"
    )
    assert render(DONE, "llava_llama_2", add_generation_prompt=False) == (
        f"[INST] {sys_block}<image>\nWhat is in the image? [/INST] A red circle. </s>"
        "<s>[INST] Where is the star? [/INST] At the top left. </s>"
    )
    assert render(MULTI, "mistral_instruct") == (
        "[INST] <image>\nWhat is in the image? [/INST] A red circle. </s>"
        "[INST] Where is the star? [/INST]"
    )
    assert render([{"role": "system", "content": "Be brief."}] + ONE, "mistral_instruct") == (
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>\nWhat is in the image? [/INST]"
    )


def test_render_plain():
    assert render(ONE, "plain") == "<image>\nWhat is in the image?\n"
    assert render(ONE + [{"role": "assistant", "content": "A red circle."}], "plain",
                  add_generation_prompt=False) == "<image>\nWhat is in the image?\nA red circle.\n"


def test_unknown_mode_names_the_known_ones(tok):
    with pytest.raises(LlavaError) as e:
        get_template("llava_v9")
    for name in [CHAT_TEMPLATE, *TEMPLATES]:
        assert name in str(e.value)
    with pytest.raises(LlavaError, match="llava_v9"):
        render(ONE, "llava_v9")
    with pytest.raises(LlavaError, match="llava_v9"):
        build_targets(tok, [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], "llava_v9", IMAGE_ID)


def test_vicuna_v1_is_what_llava_1_5_trained_with():
    t = get_template("vicuna_v1")
    assert (t.roles, t.style, t.sep, t.sep2, t.system) == (("USER", "ASSISTANT"), "two", " ", "</s>", USER_SYSTEM)


# ---------------------------------------------------------------- tokenize


def original_tokenizer_image_token(prompt, tokenizer, image_id):
    """A re-statement of the original's llava/mm_utils.py tokenizer_image_token."""
    chunks = [tokenizer(c).input_ids for c in prompt.split("<image>")]
    offset = 1 if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id else 0
    ids = [chunks[0][0]] if offset else []
    pieces = []
    for k, chunk in enumerate(chunks):
        if k:
            pieces.append([image_id] * (offset + 1))
        pieces.append(chunk)
    for piece in pieces:
        ids.extend(piece[offset:])
    return ids


PROMPTS = [
    "USER: What is in the image? ASSISTANT:",  # no image
    "<image>\nWhat is in the image?",  # at the start
    "USER: <image>\nWhat is in the image? ASSISTANT:",  # in the middle
    "Describe the image briefly.<image>",  # at the end
    "<image> and <image>: how many objects are there?",  # two
    f"{HUMAN_SYSTEM} USER: <image>\nWhat color is the triangle? ASSISTANT: Green.</s>USER: <image>\nWhere? ASSISTANT:",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenize_matches_original(tok, wrapper, prompt):
    expected = original_tokenizer_image_token(prompt, tok, IMAGE_ID)
    assert tokenize(tok, prompt, IMAGE_ID) == expected
    assert tokenize(wrapper, prompt, IMAGE_ID) == expected
    assert expected.count(BOS) == 1 and expected[0] == BOS
    assert expected.count(IMAGE_ID) == prompt.count("<image>")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenize_expands_visual_tokens(tok, prompt):
    one = original_tokenizer_image_token(prompt, tok, IMAGE_ID)
    expected = [x for i in one for x in ([i] * 5 if i == IMAGE_ID else [i])]
    assert tokenize(tok, prompt, IMAGE_ID, num_visual_tokens=5) == expected


def test_tokenize_without_image_in_vocabulary(tok):
    # The original's ids do not depend on the vocabulary: a foreign image id works the same.
    prompt = "USER: <image>\nWhat is it? ASSISTANT:"
    assert tokenize(tok, prompt, -200) == original_tokenizer_image_token(prompt, tok, -200)


def test_tokenize_no_double_bos(tok):
    # A text that writes the BOS itself (some chat templates do) gets one, as in mlx-lm.
    for prompt in ("<s>USER: <image>\nHi", "<s>USER: hi"):
        ids = tokenize(tok, prompt, IMAGE_ID)
        assert ids[0] == BOS and ids.count(BOS) == 1
        assert ids[1:] == original_tokenizer_image_token(prompt, tok, IMAGE_ID)[2:]


# ---------------------------------------------------------------- targets


def offsets_tokens(tokenizer, prompt, n_visual):
    """(ids, character spans) of the original's tokenization, from per-chunk offsets.

    Image tokens get an empty span at the image's place."""
    ids, spans, base = [], [], 0
    for k, chunk in enumerate(prompt.split("<image>")):
        enc = tokenizer(chunk, return_offsets_mapping=True)
        pairs = list(zip(enc.input_ids, enc.offset_mapping))
        if k:
            ids += [IMAGE_ID] * n_visual
            spans += [(base - 1, base - 1)] * n_visual
            pairs = pairs[1:]
        ids += [i for i, _ in pairs]
        spans += [(base + s, base + e) for _, (s, e) in pairs]
        base += len(chunk) + len("<image>")
    return ids, spans


def expected_labels(ids, spans, trained):
    """A token is trained iff its characters overlap one of the `trained` ranges."""
    return [
        i if any(s < b and e > a for a, b in trained) and i != IMAGE_ID else IGNORE_INDEX
        for i, (s, e) in zip(ids, spans)
    ]


def trained_runs(ids, labels):
    runs, run = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == i
            run.append(i)
        elif run:
            runs.append(run)
            run = []
    return runs + ([run] if run else [])


def check(tokenizer, conversation, mode, prompt, answer_ends, n_visual=1):
    """build_targets gives the original's ids for `prompt` and trains exactly the
    text after each "ASSISTANT:" / "[/INST]" up to and including `answer_end`."""
    ids, labels = build_targets(tokenizer, conversation, mode, IMAGE_ID, n_visual)
    want_ids, spans = offsets_tokens(tokenizer, prompt, n_visual)
    assert ids == want_ids
    marker = " ASSISTANT:" if TEMPLATES[mode].style == "two" else "[/INST]"
    trained, pos = [], 0
    answers = [t["value"] for t in conversation if t["from"] == "gpt"]
    for answer, end in zip(answers, answer_ends):
        start = prompt.index(marker, pos) + len(marker)
        stop = prompt.index(answer + end, start) + len(answer + end)
        trained.append((start, stop))
        pos = stop
    assert labels == expected_labels(ids, spans, trained)
    return ids, labels


def conv(*values, image=None):
    turns = [{"from": ("human", "gpt")[k % 2], "value": v} for k, v in enumerate(values)]
    if image is not None:
        turns[0]["value"] = image
    return turns


ROUNDS = [
    ("What is in the image?", "A red circle and a blue square."),
    ("What color is the triangle?", "The triangle is green."),
    ("How many objects are there?", "There are three objects."),
]


@pytest.mark.parametrize("mode,system", [("llava_v1", HUMAN_SYSTEM), ("vicuna_v1", USER_SYSTEM)])
@pytest.mark.parametrize("rounds", [1, 2, 3])
@pytest.mark.parametrize("with_image", [True, False])
def test_targets_two_style(tok, mode, system, rounds, with_image):
    pairs = ROUNDS[:rounds]
    values = [v for pair in pairs for v in pair]
    if with_image:
        values[0] = values[0] + "\n<image>"  # preprocess_multimodal moves it to the front
    prompt = system + " " + "".join(
        f"USER: {('<image>' + chr(10)) if with_image and k == 0 else ''}{q} ASSISTANT: {a}</s>"
        for k, (q, a) in enumerate(pairs)
    )
    ids, labels = check(tok, conv(*values), mode, prompt, ["</s>"] * rounds, n_visual=4)
    answers = [a for _, a in pairs]
    assert [tok.decode(r) for r in trained_runs(ids, labels)] == [f"{a}</s>" for a in answers]
    assert ids.count(IMAGE_ID) == (4 if with_image else 0)
    if not with_image:  # text-only samples: the plain tokenizer, as the original
        assert ids == tok(prompt).input_ids


def test_targets_two_style_wrapper_and_transformers_agree(tok, wrapper):
    turns = conv("<image>\nWhat is in the image?", "A red circle.", "Where is the star?", "At the top left.")
    assert build_targets(wrapper, turns, "vicuna_v1", IMAGE_ID, 3) == build_targets(tok, turns, "vicuna_v1", IMAGE_ID, 3)


def original_preprocess_v1_labels(prompt, tokenizer):
    """The original's preprocess_v1 masking with its tokenizer-version branch
    (tokenizers here is >= 0.14), for a text-only prompt."""
    ids = tokenizer(prompt).input_ids
    target = list(ids)
    sep = " ASSISTANT: "
    cur = 1
    target[:cur] = [IGNORE_INDEX] * cur
    for i, rou in enumerate(prompt.split("</s>")):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tokenizer(rou).input_ids)
        instruction_len = len(tokenizer(parts[0]).input_ids) - 2
        if i != 0 and not tokenizer.legacy:
            round_len -= 1
            instruction_len -= 1
        for j in range(cur, min(cur + instruction_len, len(target))):
            target[j] = IGNORE_INDEX
        cur += round_len
    target[cur:] = [IGNORE_INDEX] * len(target[cur:])
    if cur != len(ids):
        target = [IGNORE_INDEX] * len(ids)
    return target


def test_targets_agree_with_original_arithmetic(tok):
    values = [v for pair in ROUNDS for v in pair]
    prompt = render(
        [{"role": ("user", "assistant")[k % 2], "content": v} for k, v in enumerate(values)],
        "vicuna_v1", add_generation_prompt=False,
    )
    assert build_targets(tok, conv(*values), "vicuna_v1", IMAGE_ID)[1] == original_preprocess_v1_labels(prompt, tok)


def test_targets_skip_leading_gpt_turn_and_accept_user_assistant(tok):
    turns = conv("<image>\nWhat is in the image?", "A red circle.")
    lead = [{"from": "gpt", "value": "Hello!"}] + turns
    renamed = [{"from": {"human": "user", "gpt": "assistant"}[t["from"]], "value": t["value"]} for t in turns]
    want = build_targets(tok, turns, "llava_v1", IMAGE_ID)
    assert build_targets(tok, lead, "llava_v1", IMAGE_ID) == want
    assert build_targets(tok, renamed, "llava_v1", IMAGE_ID) == want


def test_targets_bad_turns(tok):
    with pytest.raises(LlavaError, match="alternate"):
        build_targets(tok, conv("a", "b") + [{"from": "gpt", "value": "c"}], "llava_v1", IMAGE_ID)
    with pytest.raises(LlavaError, match="speaker"):
        build_targets(tok, [{"from": "bot", "value": "a"}], "llava_v1", IMAGE_ID)


def test_targets_mismatch_masks_everything(tok, caplog):
    # An answer holding the separator cannot be split into rounds: the
    # original's "tokenization mismatch", every label masked.
    turns = conv("<image>\nWhat is it?", "It says USER: hi ASSISTANT: hello.")
    with caplog.at_level(logging.WARNING, logger="mlx_llava.conversation"):
        ids, labels = build_targets(tok, turns, "llava_v1", IMAGE_ID)
    assert labels == [IGNORE_INDEX] * len(ids)
    assert "tokenization mismatch" in caplog.text


@pytest.mark.parametrize("mode", ["llava_llama_2", "mistral_instruct"])
@pytest.mark.parametrize("rounds", [1, 2, 3])
def test_targets_llama_2(tok, mode, rounds):
    pairs = ROUNDS[:rounds]
    values = [v for pair in pairs for v in pair]
    values[0] = "<image>\n" + values[0]
    t = TEMPLATES[mode]
    first = f"<<SYS>>\n{t.system}\n<</SYS>>\n\n" if t.system else ""
    prompt = "".join(
        f"{t.sep if k else ''}[INST] {first if k == 0 else ''}{'<image>' + chr(10) if k == 0 else ''}{q} [/INST] {a} </s>"
        for k, (q, a) in enumerate(pairs)
    )
    ids, labels = check(tok, conv(*values), mode, prompt, [" </s>"] * rounds, n_visual=2)
    # preprocess_llama_2 learns the answer, the space before "</s>", and "</s>".
    assert [tok.decode(r) for r in trained_runs(ids, labels)] == [f"{a} </s>" for _, a in pairs]


def test_targets_plain(tok):
    caption = "There are two shapes on a white background."
    turns = conv("Describe the image briefly.\n<image>", caption)
    ids, labels = build_targets(tok, turns, "plain", IMAGE_ID, num_visual_tokens=3)
    tail = tok(caption + "\n").input_ids[1:]  # the caption and its newline, no BOS, no </s>
    assert ids == [BOS] + [IMAGE_ID] * 3 + tail
    assert labels == [IGNORE_INDEX] * 4 + tail
    assert tok.decode(tail) == caption + "\n"


def test_targets_plain_needs_image_and_caption(tok):
    with pytest.raises(LlavaError, match="plain"):
        build_targets(tok, conv("Describe.", "A caption."), "plain", IMAGE_ID)
    with pytest.raises(LlavaError, match="plain"):
        build_targets(tok, conv("<image>\nA", "B", "C", "D"), "plain", IMAGE_ID)


# ---------------------------------------------------------------- chat_template


def test_chat_template_render(tok, templated_dir, wrapper):
    from mlx_lm.tokenizer_utils import load
    from transformers import AutoTokenizer

    for t in (AutoTokenizer.from_pretrained(templated_dir), load(Path(templated_dir))):
        assert render(ONE, CHAT_TEMPLATE, t) == "USER: <image>\nWhat is in the image? ASSISTANT:"
        assert render(DONE, CHAT_TEMPLATE, t, add_generation_prompt=False) == (
            "USER: <image>\nWhat is in the image? ASSISTANT: A red circle. "
            "USER: Where is the star? ASSISTANT: At the top left. "
        )
        assert render([{"role": "system", "content": "Be brief."}] + ONE, CHAT_TEMPLATE, t) == (
            "Be brief. USER: <image>\nWhat is in the image? ASSISTANT:"
        )
    with pytest.raises(LlavaError, match="chat template"):
        render(ONE, CHAT_TEMPLATE, wrapper)  # the fixture tokenizer has none
    with pytest.raises(LlavaError, match="chat template"):
        render(ONE, CHAT_TEMPLATE, None)


def test_chat_template_string_content_fallback(tokenizer_dir):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tokenizer_dir)
    t.chat_template = STRING_TEMPLATE
    assert render(MULTI, CHAT_TEMPLATE, t) == (
        "<|user|><image>\nWhat is in the image?</s><|assistant|>A red circle.</s>"
        "<|user|>Where is the star?</s><|assistant|>"
    )


@pytest.mark.parametrize("template,ends", [(LIST_TEMPLATE, " "), (STRING_TEMPLATE, "</s>")])
def test_chat_template_targets(tokenizer_dir, template, ends):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tokenizer_dir)
    t.chat_template = template
    turns = conv("What is in the image?\n<image>", "A red circle.", "Where is the star?", "At the top left.")
    ids, labels = build_targets(t, turns, CHAT_TEMPLATE, IMAGE_ID, num_visual_tokens=2)
    messages = [{"role": ("user", "assistant")[k % 2], "content": x["value"]} for k, x in enumerate(turns)]
    messages[0]["content"] = "<image>\nWhat is in the image?"
    prompt = render(messages, CHAT_TEMPLATE, t, add_generation_prompt=False)
    want_ids, spans = offsets_tokens(t, prompt, 2)
    assert ids == want_ids and ids.count(IMAGE_ID) == 2
    # Each assistant message's rendered text (after the generation prompt) is learned.
    trained = []
    for k in (1, 3):
        start = len(render(messages[:k], CHAT_TEMPLATE, t, add_generation_prompt=True))
        stop = len(render(messages[:k + 1], CHAT_TEMPLATE, t, add_generation_prompt=False))
        assert prompt[start:stop].strip().startswith(messages[k]["content"])
        trained.append((start, stop))
    assert labels == expected_labels(ids, spans, trained)
    runs = [t.decode(r).strip() for r in trained_runs(ids, labels)]
    assert runs == [f"{a}{ends}".strip() for a in ("A red circle.", "At the top left.")]
