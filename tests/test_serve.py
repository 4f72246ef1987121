"""`mlx-llava serve`: the demo model behind the OpenAI-compatible API, talked to with
the official `openai` client (and httpx where a client must misbehave).

One server (in a thread of this process, on a free loopback port) serves
every test here but the SIGTERM one, which runs `mlx-llava serve` itself.
"""

import base64
import http.server
import io
import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

import mlx_llava
from mlx_llava import generate
from mlx_llava.batch import Request, batch_generate
from mlx_llava.demo import heldout_dir
from mlx_llava.eval import load_questions
from mlx_llava.generate import Chat
from mlx_llava.serve import Settings, start
from mlx_llava.weights import default_model

KEY = "test-key"
MODEL = "demo"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def demo():
    return mlx_llava.load(default_model())


@pytest.fixture(scope="module")
def server(demo):
    settings = Settings(model_id=MODEL, api_key=KEY, max_batch=8, max_queue=4, max_body_mb=1,
                        max_image_pixels=400 * 400)
    with start(*demo, settings) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def questions():
    """Eight held-out questions, without their "answer in a word" line: answered in sentences."""
    qs = load_questions(heldout_dir() / "questions.json")[:8]
    return [(q["question"].split("\n")[0], heldout_dir() / "images" / q["image"]) for q in qs]


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def ask(question, image=None, fmt=data_url):
    content = ([{"type": "image_url", "image_url": {"url": fmt(image)}}] if image else []) + [
        {"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def stats(server) -> dict:
    return httpx.get(server.url + "/stats", headers={"Authorization": f"Bearer {KEY}"}).json()


def post(server, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + "/v1/chat/completions", content=data, headers=headers, **{"timeout": 60, **kw})


# ---------------------------------------------------------------- answers


def test_health_and_models(server, client):
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "model": MODEL}
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_answers_equal_generate(demo, client, questions):
    """Streamed or not, the text is `generate`'s with the same settings; usage is counted."""
    model, processor = demo
    for question, image in questions[:3]:
        expected = generate(model, processor, question, image=str(image), max_tokens=24)
        answer = client.chat.completions.create(model=MODEL, messages=ask(question, image), max_tokens=24)
        assert answer.choices[0].message.content == expected
        assert answer.choices[0].finish_reason in ("stop", "length")
        ids = processor.encode(processor.prompt([{"role": "user", "content": f"<image>\n{question}"}]))
        assert answer.usage.prompt_tokens == len(ids)
        assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens > len(ids)

        chunks = list(client.chat.completions.create(model=MODEL, messages=ask(question, image), max_tokens=24,
                                                     stream=True, stream_options={"include_usage": True}))
        texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert len(texts) > 1 and "".join(texts) == expected  # streamed piece by piece
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == answer.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == answer.usage.total_tokens


def test_answer_equals_the_cli(client):
    """The same request gives `mlx-llava generate`'s text (the command, run as a user runs it)."""
    image, question = EXAMPLES / "scene.png", "What is in the image?"
    cli = subprocess.run([sys.executable, "-m", "mlx_llava.cli", "generate", "-i", str(image), "-p", question,
                          "--max-tokens", "20", "--temperature", "0.7", "--seed", "11"],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    answer = client.chat.completions.create(model=MODEL, messages=ask(question, image), max_tokens=20,
                                            temperature=0.7, seed=11)
    assert answer.choices[0].message.content == cli.stdout.rstrip("\n")


def test_several_images_and_turns(demo, client, questions):
    """Two images in two turns, the first answer in the history: the answer is
    `Chat`'s, which sees both images (not only the last)."""
    model, processor = demo
    (q1, image1), (q2, image2) = questions[0], questions[5]
    chat = Chat(model, processor, image=str(image1))
    first = chat.say(q1, max_tokens=20)
    second = chat.say(q2, image=str(image2), max_tokens=20)
    messages = ask(q1, image1) + [{"role": "assistant", "content": first}] + ask(q2, image2)
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20)
    assert answer.choices[0].message.content == second
    # Both images in one message, in order: the library's answer to the same conversation.
    both = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image1)}},
                                         {"type": "image_url", "image_url": {"url": data_url(image2)}},
                                         {"type": "text", "text": "Describe the images."}]}]
    two = client.chat.completions.create(model=MODEL, messages=both, max_tokens=8)
    conversation = [{"role": "user", "content": "<image>\n<image>\nDescribe the images."}]
    assert two.choices[0].message.content == batch_generate(
        model, processor, [Request(conversation, [str(image1), str(image2)], max_tokens=8)])[0]
    ids = processor.encode(processor.prompt(conversation))
    assert two.usage.prompt_tokens == len(ids) and ids.count(processor.image_token_index) == 18


def test_next_turn_reuses_the_cached_prefix(demo, server, client, questions):
    model, processor = demo
    question, image = questions[2]
    first = client.chat.completions.create(model=MODEL, messages=ask(question, image), max_tokens=20)
    before = stats(server)["prefix_cache"]
    history = ask(question, image) + [{"role": "assistant", "content": first.choices[0].message.content}]
    second = client.chat.completions.create(model=MODEL, messages=history + ask("Is there a circle?"), max_tokens=12)
    after = stats(server)["prefix_cache"]
    assert after["hits"] == before["hits"] + 1
    # The image and the whole first exchange came from the cache.
    assert after["reused_tokens"] - before["reused_tokens"] >= first.usage.total_tokens - 1
    chat = Chat(model, processor, image=str(image))
    chat.say(question, max_tokens=20)
    assert second.choices[0].message.content == chat.say("Is there a circle?", max_tokens=12)


def test_image_sources(demo, server, client, questions, tmp_path):
    """data: URLs in PNG, JPEG and WebP; http(s) URLs; local paths only when allowed."""
    model, processor = demo
    question, image = questions[1]
    picture = Image.open(image).convert("RGB")
    for fmt in ("JPEG", "WEBP"):
        buffer = io.BytesIO()
        picture.save(buffer, fmt, quality=95)
        expected = generate(model, processor, question, image=buffer.getvalue(), max_tokens=16)
        url = f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()
        got = client.chat.completions.create(model=MODEL, messages=ask(question, url, fmt=str), max_tokens=16)
        assert got.choices[0].message.content == expected

    expected = generate(model, processor, question, image=str(image), max_tokens=16)
    folder = image.parent

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(folder), **kw)

        def log_message(self, *a):
            pass

    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{images.server_address[1]}/{image.name}"
        got = client.chat.completions.create(model=MODEL, messages=ask(question, url, fmt=str), max_tokens=16)
        assert got.choices[0].message.content == expected
        missing = post(server, {"messages": ask(question, url + ".gone", fmt=str)})
        assert missing.status_code == 400 and "HTTP 404" in missing.json()["error"]["message"]
    finally:
        images.shutdown()

    refused = post(server, {"messages": ask(question, str(image), fmt=str)})
    assert refused.status_code == 400 and "--allow-local-files" in refused.json()["error"]["message"]
    server.app.state.settings.allow_local_files = True
    try:
        for url in (str(image), image.as_uri()):
            got = client.chat.completions.create(model=MODEL, messages=ask(question, url, fmt=str), max_tokens=16)
            assert got.choices[0].message.content == expected
    finally:
        server.app.state.settings.allow_local_files = False


def test_sampling_options(demo, client, questions):
    model, processor = demo
    question, image = questions[3]
    expected = generate(model, processor, question, image=str(image), max_tokens=30, temperature=0.9, top_p=0.8,
                        seed=5)
    got = client.chat.completions.create(model=MODEL, messages=ask(question, image), max_completion_tokens=30,
                                         temperature=0.9, top_p=0.8, seed=5, n=1)
    assert got.choices[0].message.content == expected
    greedy = generate(model, processor, question, image=str(image), max_tokens=30)
    words = greedy.split()
    assert len(words) >= 3
    stop = " " + words[2]
    cut = client.chat.completions.create(model=MODEL, messages=ask(question, image), stop=[stop, "zzz"])
    assert cut.choices[0].message.content == greedy[: greedy.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=MODEL, messages=ask(question, image), stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == greedy[: greedy.index(stop)]
    short = client.chat.completions.create(model=MODEL, messages=ask(question, image), max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2


# ---------------------------------------------------------------- errors


def error(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    return body["error"]


def test_error_statuses(server, client, questions, tmp_path):
    question, image = questions[0]
    good = {"model": MODEL, "messages": ask(question, image), "max_tokens": 4}
    # 400: malformed bodies, undecodable images, unknown fields and values
    assert "not valid JSON" in error(post(server, b"{bad json"), 400)["message"]
    for body, words in [
        ({"messages": "hi"}, "messages must be a non-empty list"),
        ({"messages": []}, "messages must be a non-empty list"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "role must be one of"),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "must be text or image_url"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n must be 1"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}, "Unrecognized request argument"),
        ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "logprobs is not supported"),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": [""]}, "stop"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "the last message must be the user's"),
        ({"messages": ask("hi", b"not an image", fmt=lambda b: "data:image/png;base64,"
                          + base64.b64encode(b).decode())}, "not an image"),
        ({"messages": ask("hi", "data:image/png;base64,@@@", fmt=str)}, "invalid base64"),
        ({"messages": ask("hi", "ftp://example.com/a.png", fmt=str)}, "unsupported image URL scheme"),
        ({"messages": [{"role": "user", "content": "the <image> token"}]}, "must not contain <image>"),
    ]:
        assert words in error(post(server, body), 400)["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=5)
    # 401: no key, a wrong key
    assert error(post(server, good, key=None), 401)["code"] == "invalid_api_key"
    assert error(httpx.get(server.url + "/v1/models"), 401)["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    # 404: an unknown path, an unknown model
    error(httpx.get(server.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}), 404)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=ask(question, image))
    # 413: a body over --max-body-mb (1), an image over --max-image-pixels (400 x 400)
    big = {"messages": [{"role": "user", "content": "x" * (1 << 20)}]}
    assert error(post(server, big), 413)["code"] == "request_too_large"
    buffer = io.BytesIO()
    Image.new("RGB", (500, 401), "white").save(buffer, "PNG")
    wide = ask("hi", buffer.getvalue(), fmt=lambda b: "data:image/png;base64," + base64.b64encode(b).decode())
    assert "200500 pixels" in error(post(server, {"messages": wide}), 413)["message"]
    # 422: a prompt longer than the context (512 tokens)
    with pytest.raises(openai.UnprocessableEntityError, match="context"):
        client.chat.completions.create(model=MODEL, messages=ask("the star " * 400, image))
    streamed = post(server, {"messages": ask("the star " * 400, image), "stream": True})
    assert error(streamed, 422)["code"] == "context_length_exceeded"
    # and the server still answers
    assert post(server, good).status_code == 200
    assert stats(server)["active"] == 0


def test_a_failing_step_fails_its_requests_only(server, client, questions):
    """An unexpected error in the model thread: those requests get a 500 (no
    traceback), the server goes on with a fresh generator."""
    question, image = questions[0]
    scheduler = server.app.state.scheduler
    broken = scheduler.generator

    def fail():
        raise RuntimeError("boom")

    broken.next = fail
    response = post(server, {"messages": ask(question, image), "max_tokens": 4})
    assert error(response, 500)["type"] == "server_error" and "boom" not in response.text
    waited = time.perf_counter()
    while scheduler.generator is broken:  # replaced right after the error is answered
        assert time.perf_counter() - waited < 5
        time.sleep(0.02)
    assert client.chat.completions.create(model=MODEL, messages=ask(question, image), max_tokens=4).choices


# ---------------------------------------------------------------- concurrency


def test_eight_clients_at_once_get_their_own_answers(server, client, questions):
    """Greedy answers to 8 requests sent together equal those sent one at a
    time, and the server decoded them in batches (its /stats)."""
    requests = [ask(q, i) for q, i in questions]
    alone = [client.chat.completions.create(model=MODEL, messages=m, max_tokens=24).choices[0].message.content
             for m in requests]
    before = stats(server)
    barrier = threading.Barrier(len(requests))

    def together(messages):
        barrier.wait()
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24).choices[0].message.content

    with ThreadPoolExecutor(len(requests)) as pool:
        got = list(pool.map(together, requests))
    assert got == alone
    assert len(set(alone)) > 3  # different questions, different answers
    after = stats(server)
    sizes = {int(k): v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    assert max(k for k, v in sizes.items() if v > 0) >= 4, sizes  # they were decoded together


def slow_steps(scheduler, seconds):
    """Make every decoding step take `seconds` (a slow model), for the tests
    that must act while requests run."""
    gen = scheduler.generator
    step = type(gen).next.__get__(gen)

    def slow():
        time.sleep(seconds)
        return step()

    gen.next = slow
    return lambda: gen.__dict__.pop("next", None)


def test_full_queue_answers_503_with_retry_after(server, questions):
    question, image = questions[0]
    scheduler = server.app.state.scheduler
    sizes = scheduler.max_batch, scheduler.max_queue
    scheduler.max_batch, scheduler.max_queue = 1, 1
    restore = slow_steps(scheduler, 0.3)
    body = {"messages": ask(question, image), "max_tokens": 6}
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post, server, body)
            while stats(server)["running"] < 1:
                time.sleep(0.02)
            second = pool.submit(post, server, body)
            while stats(server)["active"] < 2:
                time.sleep(0.02)
            refused = post(server, body)
            assert error(refused, 503)["code"] == "server_busy"
            assert int(refused.headers["Retry-After"]) >= 1
            with pytest.raises(openai.InternalServerError):  # what the client sees past its retries
                openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0).chat.completions.create(
                    model=MODEL, messages=body["messages"])
            assert first.result().status_code == second.result().status_code == 200  # none lost
            assert first.result().json()["choices"] == second.result().json()["choices"]
    finally:
        restore()
        scheduler.max_batch, scheduler.max_queue = sizes
    assert stats(server)["active"] == 0


def test_a_client_that_leaves_frees_its_slot(server, questions):
    """Streaming or not, a client that disconnects is cancelled at the next
    step, long before its answer would have ended."""
    question, image = questions[0]
    scheduler = server.app.state.scheduler
    restore = slow_steps(scheduler, 0.5)  # an answer of 10+ tokens: 5 s or more
    body = {"messages": ask(question, image), "max_tokens": 30}
    try:
        before = stats(server)
        with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True},
                          headers={"Authorization": f"Bearer {KEY}"}) as response:
            for line in response.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    break  # the first word: now leave
        left = time.perf_counter()
        while stats(server)["cancelled"] == before["cancelled"]:
            assert time.perf_counter() - left < 3
            time.sleep(0.05)
        with pytest.raises(httpx.ReadTimeout):
            post(server, body, timeout=1.5)
        left = time.perf_counter()
        while stats(server)["cancelled"] < before["cancelled"] + 2:
            assert time.perf_counter() - left < 3
            time.sleep(0.05)
        after = stats(server)
        assert after["completed"] == before["completed"] and after["running"] == after["active"] == 0
    finally:
        restore()


def test_sigterm_finishes_running_requests_then_exits(tmp_path):
    """`mlx-llava serve` stops taking requests on SIGTERM, finishes the one
    that runs, and exits cleanly."""
    process = subprocess.Popen([sys.executable, "-m", "mlx_llava.cli", "serve", "--port", "0",
                                "--log-level", "warning"], stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()
        assert "serving mlx-llava-demo on http://127.0.0.1:" in line, line
        url = line.split(" on ")[1].split()[0]
        body = {"messages": ask("What is in the image?", EXAMPLES / "scene.png"), "max_tokens": 24, "stream": True}
        lines = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                lines.append(line)
                if len(lines) == 1:
                    process.send_signal(signal.SIGTERM)
        assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"
        assert any('"finish_reason": "stop"' in x or '"finish_reason": "length"' in x for x in lines)
        code = process.wait(timeout=30)
        said = process.stderr.read()
        assert code == 0, said[-2000:]
        assert "stopped" in said
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
    finally:
        if process.poll() is None:
            process.kill()
