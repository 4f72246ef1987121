"""The LLM-teacher pipeline: the paper's prompt, reply parsing, both teachers, the CLI.

The OpenAI-compatible teacher is a fake server on 127.0.0.1 (a thread that
stops itself); the mlx-lm teacher is a tiny random LLaMA saved with a chat
template. No network.
"""

import json
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from endpoint import Endpoint

from mlx_llava.datagen import DETAIL_INSTRUCTIONS, read_coco
from mlx_llava.datagen.prompts import PROMPTS
from mlx_llava.datagen.teacher import (
    TYPES,
    OpenAITeacher,
    Reply,
    ReplyError,
    build_messages,
    instruct,
    make_sample,
    make_teacher,
    normalize_box,
    parse_turns,
    parse_types,
    symbolic_context,
)
from mlx_llava.demo.world import make_scenes, write_coco
from mlx_llava.errors import LlavaError

# ---------------------------------------------------------------- the prompt

# Phrases of the paper's system messages (haotian-liu/LLaVA playground/data/prompts).
SYSTEM_PHRASES = {
    "conversation": ["Design a conversation between you and a person asking about this photo.",
                     "Only include questions that have definite answers"],
    "detail": ["Using the provided caption and bounding box information, describe the scene in a detailed manner.",
               "represented as (x1, y1, x2, y2) with floating numbers ranging from 0 to 1"],
    "reasoning": ["Create complex questions beyond describing the scene.",
                  "create a plausible question about the image, and provide the answer in detail"],
}
# How each of the paper's few-shot examples begins: (context, response).
EXAMPLE_STARTS = {
    "conversation": [("There is a movie theater", "Question:\nWhat color is the fire hydrant in the image?"),
                     ("A man is skiing in the open snow", "Question:\nWhat is the skier doing?")],
    "detail": [("A harbor filled with lots of boats", "It is a harbor filled with numerous boats"),
               ("A group of people standing outside of a black vehicle", "The image is an underground parking"),
               ("A man holds a Wii-mote above his head", "The image shows two men standing in a room")],
    "reasoning": [("A man wearing multiple neck ties", "Question:\nWhat is unusual about this photo?"),
                  ("A group of people standing outside of a black vehicle", "Question:\nWhat challenges do these"),
                  ("There is a movie theater", "Question:\nWhat challenges might this city face?")],
}

RECORD = {  # a COCO-like record: a 640x480 photo, boxes as [x, y, w, h] pixels
    "id": 33471, "file_name": "000000033471.jpg", "width": 640, "height": 480,
    "captions": ["A dog on a sofa.", "A brown dog lies on a couch."],
    "objects": [{"category": "dog", "bbox": [12.5, 20, 50.25, 59.9]},
                {"category": "couch", "bbox": [-1, 100, 645, 380]}],
}


def test_normalize_box_by_hand():
    # x1 = 12.5/640 = 0.01953, y1 = 20/480 = 0.04167, x2 = 62.75/640 = 0.09805, y2 = 79.9/480 = 0.16646
    assert normalize_box([12.5, 20, 50.25, 59.9], 640, 480) == [0.02, 0.042, 0.098, 0.166]
    # boxes spilling over the border are clipped; 0 and 1 print as the paper's 0.0 and 1.0
    assert normalize_box([-1, 100, 645, 380], 640, 480) == [0.0, 0.208, 1.0, 1.0]
    assert symbolic_context(RECORD) == (
        "A dog on a sofa.\nA brown dog lies on a couch.\n\n"
        "dog: [0.02, 0.042, 0.098, 0.166]\ncouch: [0.0, 0.208, 1.0, 1.0]"
    )


@pytest.mark.parametrize("kind", TYPES)
def test_messages_follow_the_paper(kind):
    messages = build_messages(RECORD, kind)
    system, *shots, query = messages
    assert system["role"] == "system"
    for phrase in SYSTEM_PHRASES[kind]:
        assert phrase in system["content"]
    assert [m["role"] for m in shots] == ["user", "assistant"] * len(EXAMPLE_STARTS[kind])
    for (user, assistant), (context, response) in zip(zip(shots[::2], shots[1::2]), EXAMPLE_STARTS[kind]):
        assert user["content"].startswith(context)
        assert assistant["content"].startswith(response)
    assert query["role"] == "user"
    captions = "A dog on a sofa.\nA brown dog lies on a couch."
    if kind == "conversation":  # the paper's conversation examples are captions only
        assert query["content"] == captions
        assert all(":" not in m["content"] for m in shots[::2])
    else:  # detail and reasoning: captions, a blank line, the boxes, as in the examples
        assert query["content"] == symbolic_context(RECORD)
        assert all("\n\n" in m["content"] and ": [" in m["content"] for m in shots[::2])
    assert build_messages(RECORD, kind, boxes=True)[-1]["content"] == symbolic_context(RECORD)


def test_world_boxes_reach_the_query(tmp_path):
    scenes = make_scenes(2, seed=3)
    write_coco(scenes, tmp_path)
    for scene, record in zip(scenes, read_coco(tmp_path / "captions.json", tmp_path / "instances.json")):
        lines = build_messages(record, "detail")[-1]["content"].split("\n")
        assert lines[: len(scene.captions)] == scene.captions and lines[len(scene.captions)] == ""
        size = scene.image_size
        for line, obj in zip(lines[len(scene.captions) + 1 :], scene.objects):
            x, y, w, h = obj.bbox
            expected = [round(x / size, 3), round(y / size, 3), round((x + w) / size, 3), round((y + h) / size, 3)]
            assert line == f"{obj.shape}: {expected}"


def test_parse_types():
    assert parse_types("detail, conversation") == ("detail", "conversation")
    with pytest.raises(LlavaError, match="complex_reasoning"):
        parse_types("complex_reasoning")


# ---------------------------------------------------------------- parsing replies

CONVERSATION = """Question:
What color is the dog?
===
Answer:
The dog is brown.
===
Question:
Where is the dog lying?
===
Answer:
On a couch.

It looks comfortable.
===
Question:
Is there a cat?
===
Answer:
No, there is only a dog."""


def test_conversation_reply_to_llava_json():
    sample = make_sample(RECORD, "conversation", CONVERSATION, random.Random(0))
    assert sample["id"] == "000000033471" and sample["image"] == "000000033471.jpg"
    assert sample["type"] == "conversation"
    turns = sample["conversations"]
    assert [t["from"] for t in turns] == ["human", "gpt"] * 3
    assert turns[0]["value"] in ("<image>\nWhat color is the dog?", "What color is the dog?\n<image>")
    assert sum("<image>" in t["value"] for t in turns) == 1
    assert [t["value"] for t in turns[1:]] == [
        "The dog is brown.", "Where is the dog lying?", "On a couch.\n\nIt looks comfortable.",
        "Is there a cat?", "No, there is only a dog.",
    ]


def test_image_token_goes_before_or_after_at_random():
    firsts = {make_sample(RECORD, "reasoning", "Question: Why?\nAnswer: Because.", random.Random(s))
              ["conversations"][0]["value"] for s in range(40)}
    assert firsts == {"<image>\nWhy?", "Why?\n<image>"}


def test_loose_formats_parse():
    assert parse_turns("Sure! Here it is.\n\n**Question:** Why?\n\n**Answer:** Because.\n") == [("Why?", "Because.")]
    assert parse_turns("<think>hmm</think>Question: A?\n===\nAnswer: B.") == [("A?", "B.")]


def test_detail_reply():
    sample = make_sample(RECORD, "detail", "  A brown dog rests on a couch. <image>\n", random.Random(1))
    question, answer = (t["value"] for t in sample["conversations"])
    assert question.replace("<image>", "").strip() in DETAIL_INSTRUCTIONS
    assert answer == "A brown dog rests on a couch."


@pytest.mark.parametrize("kind,reply", [
    ("conversation", "The image shows a dog."),  # no turns
    ("conversation", "Question:\nWhat?\n===\nAnswer:\nA dog.\n===\nQuestion:\nAnd?"),  # no last answer
    ("conversation", "Answer:\nA dog.\n===\nQuestion:\nWhat?"),  # wrong order
    ("reasoning", "Question:\nWhy?\n===\nAnswer:\n"),  # empty answer
    ("detail", "   "),
    ("detail", Reply("A dog on a", truncated=True)),  # cut off at max_tokens
])
def test_malformed_replies_raise(kind, reply):
    with pytest.raises(ReplyError):
        make_sample(RECORD, kind, reply, random.Random(0))


# ---------------------------------------------------------------- a fake OpenAI-compatible endpoint


class FakeEndpoint(Endpoint):
    """An OpenAI-style /v1/chat/completions on 127.0.0.1 that answers from the request.

    It fails the first `fail_first` requests with HTTP 500, wants `key` (if set)
    as a bearer token, answers malformed replies for images whose first caption
    is in `bad`, and stops itself after `lifetime` seconds whatever happens.
    """

    def __init__(self, fail_first=0, key=None, bad=(), lifetime=120):
        self.requests, self.fail_first, self.key, self.bad = [], fail_first, key, set(bad)
        super().__init__(lifetime)

    def answer(self, path, auth, body):
        if path != "/v1/chat/completions":
            return 404, {"error": {"message": "not found"}}
        if self.key and auth != f"Bearer {self.key}":
            return 401, {"error": {"message": "Incorrect API key provided"}}
        self.requests.append(body)
        if len(self.requests) <= self.fail_first:
            return 500, {"error": {"message": "overloaded"}}
        kind = next(k for k in TYPES if body["messages"][0]["content"] == PROMPTS[k].system)
        first_caption = body["messages"][-1]["content"].split("\n")[0]
        if first_caption in self.bad:  # prose where turns belong; no content at all for detail
            text = None if kind == "detail" else "I'm sorry, I can't do that."
        elif kind == "detail":
            text = f"The image shows this: {first_caption}"
        else:
            text = f"Question:\nWhat does the image show?\n===\nAnswer:\n{first_caption}"
            if kind == "conversation":
                text += "\n===\nQuestion:\nIs it a photo?\n===\nAnswer:\nIt is a rendered picture."
        message = {"role": "assistant", "content": text}
        return 200, {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """Four synthetic images as a COCO captions + instances pair."""
    folder = tmp_path_factory.mktemp("coco")
    scenes = make_scenes(4, seed=1)
    captions, instances = write_coco(scenes, folder)
    return scenes, captions, instances


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_openai_teacher_end_to_end_and_resume(coco, tmp_path):
    scenes, captions, instances = coco
    bad = scenes[2].captions[0]
    out = tmp_path / "instruct.jsonl"
    with FakeEndpoint(fail_first=1, key="sk-test", bad=[bad]) as server:
        teacher = OpenAITeacher(server.url, "gpt-test", api_key="sk-test", backoff=0.01)
        first = instruct(read_coco(captions, instances), teacher, out, limit=2, seed=5)
        assert sum(first.written.values()) == 6 and not first.failed
        assert len(server.requests) == 7  # the 500 was retried
        with open(out, "a") as f:  # a run killed in the middle of a line
            f.write('{"id": "train_000002", "type": "conv')
        second = instruct(read_coco(captions, instances), teacher, out, seed=5)
        assert sum(second.done.values()) == 6
        assert second.failed == {"conversation": 1, "detail": 1, "reasoning": 1}
        assert sum(second.written.values()) == 3
        assert "failed to parse: 3" in str(second)
        requests = server.requests

    # The request: the paper's system message, few-shot turns, the image's context.
    body = requests[-1]
    assert body["model"] == "gpt-test" and body["max_tokens"] == 1024
    kind = next(k for k in TYPES if body["messages"][0]["content"] == PROMPTS[k].system)
    record = list(read_coco(captions, instances))[3]
    assert body["messages"] == build_messages(record, kind)

    samples = read_jsonl(out)
    keys = [(s["id"], s["type"]) for s in samples]
    assert len(keys) == len(set(keys)) == 9
    assert {s["id"] for s in samples} == {Path(s.file_name).stem for s in scenes} - {Path(scenes[2].file_name).stem}
    for s in samples:
        scene = next(x for x in scenes if x.file_name == s["image"])
        turns = s["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * {"conversation": 2}.get(s["type"], 1)
        assert "<image>" in turns[0]["value"] and sum("<image>" in t["value"] for t in turns) == 1
        assert scene.captions[0] in turns[1]["value"]

    # The same seed gives the same samples.
    again = tmp_path / "again.jsonl"
    with FakeEndpoint(bad=[bad]) as server:
        instruct(read_coco(captions, instances), OpenAITeacher(server.url, "gpt-test"), again, seed=5)
    assert sorted(read_jsonl(again), key=json.dumps) == sorted(samples, key=json.dumps)


def test_openai_teacher_errors(tmp_path):
    messages = build_messages(RECORD, "detail")
    with FakeEndpoint(key="sk-right") as server:
        with pytest.raises(LlavaError, match="refused the API key .*Incorrect API key"):
            OpenAITeacher(server.url, "m", api_key="sk-wrong")(messages)
        with pytest.raises(LlavaError, match="rejected the request \\(HTTP 404\\)"):
            OpenAITeacher(server.url.replace("/v1", "/v2"), "m", api_key="sk-right")(messages)
    with FakeEndpoint(fail_first=10) as server:
        with pytest.raises(LlavaError, match="failed 3 times; last: HTTP 500"):
            OpenAITeacher(server.url, "m", retries=2, backoff=0.01)(messages)
    with pytest.raises(LlavaError, match="connection refused"):
        OpenAITeacher(f"http://127.0.0.1:{free_port()}/v1", "m")(messages)
    with pytest.raises(LlavaError, match="NO_SUCH_KEY_VAR"):
        make_teacher("m", url="http://127.0.0.1:1/v1", api_key_env="NO_SUCH_KEY_VAR")


def free_port():
    """A loopback port nothing listens on: connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- a tiny mlx-lm teacher

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_lm(tokenizer_dir, tmp_path_factory):
    """A random 1-layer LLaMA in mlx-lm's layout, with a chat-templated tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny_lm")
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            shutil.copy(f, path / f.name)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    config = dict(model_type="llama", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                  num_attention_heads=2, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=len(tok),
                  tie_word_embeddings=True)  # no padded rows: a sampled id always decodes
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(**config))
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_mlx_teacher_runs_to_the_end(tiny_lm, coco, tmp_path):
    _, captions, instances = coco
    teacher = make_teacher(str(tiny_lm))
    ids = teacher.prompt(build_messages(RECORD, "reasoning"))
    assert ids[0] == 1  # the template's BOS, once
    text = teacher.tokenizer.decode(ids)
    assert PROMPTS["reasoning"].system[:40] in text and text.endswith("assistant:")

    out = tmp_path / "mlx.jsonl"
    summary = instruct(read_coco(captions, instances), teacher, out, limit=2, max_tokens=6, temperature=1.0)
    # Gibberish: no Question/Answer turns; a detail reply may pass only if it stopped by itself.
    assert summary.failed["conversation"] == summary.failed["reasoning"] == 2
    assert summary.failed["detail"] + summary.written["detail"] == 2
    assert len(read_jsonl(out)) == summary.written["detail"]


def test_mlx_teacher_missing_directory(tmp_path):
    with pytest.raises(LlavaError, match="no such mlx-lm model directory"):
        make_teacher(str(tmp_path / "nope" / "model" / "dir"))


# ---------------------------------------------------------------- the CLI


def run(*args, group="datagen"):
    return subprocess.run([sys.executable, "-m", "mlx_llava.cli", group, *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_cli_world(tmp_path):
    result = run("world", "--output", tmp_path / "world", "--train", 3, "--test", 2, "--image-size", 48, group="demo")
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "world" / "meta.json").read_text())
    assert meta["n_train"] == 3 and meta["image_size"] == 48
    assert len(json.loads((tmp_path / "world" / "instruct.json").read_text())) == 9
    assert "wrote" in result.stdout


def test_cli_stage1(coco, tmp_path):
    scenes, captions, _ = coco
    result = run("stage1", "--captions", captions, "--output", tmp_path / "s1.json", "--seed", 2)
    assert result.returncode == 0, result.stderr
    samples = json.loads((tmp_path / "s1.json").read_text())
    assert len(samples) == sum(len(s.captions) for s in scenes)
    assert samples[0]["conversations"][1]["value"] == scenes[0].captions[0]


def test_cli_instruct(coco, tmp_path):
    _, captions, instances = coco
    out = tmp_path / "out.jsonl"
    with FakeEndpoint() as server:
        result = run("instruct", "--captions", captions, "--instances", instances, "--output", out,
                     "--teacher-url", server.url, "--teacher-model", "gpt-test", "--types", "conversation,detail",
                     "--limit", 1)
    assert result.returncode == 0, result.stderr
    assert "written: 2 (conversation 1, detail 1)" in result.stdout
    assert {s["type"] for s in read_jsonl(out)} == {"conversation", "detail"}


def test_cli_instruct_refused_port(coco, tmp_path):
    _, captions, instances = coco
    result = run("instruct", "--captions", captions, "--instances", instances, "--output", tmp_path / "o.jsonl",
                 "--teacher-url", f"http://127.0.0.1:{free_port()}/v1", "--teacher-model", "gpt-test")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "connection refused" in lines[0], result.stderr
