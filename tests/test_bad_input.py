"""Bad input as a careless user meets it (issue #25, item 8).

One test per class of fault, parametrised over its cases, each run as a user
runs it: `mlx-llava ...` through the same `main()` the console script calls,
in this process (a fresh interpreter costs seconds here), or in a real
subprocess where the process boundary matters (signals, what is imported).
Every case must end in exactly one line on stderr, `error: ...`, a non-zero
exit, no traceback; nothing may be left half-written and nothing lost (the
source folder intact, the chat's conversation kept).
"""

import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import mlx_llava
from mlx_llava.errors import LlavaError
from mlx_llava.weights import default_model

# ---------------------------------------------------------------- running the command


@pytest.fixture
def cli(monkeypatch, capfd):
    """`mlx-llava *args` in this process, stdin given as text; -> CompletedProcess.
    capfd, not capsys: a library writing to file descriptor 2 must show too."""
    from mlx_llava.cli import main

    def run(*args, stdin=""):
        monkeypatch.setattr(sys, "argv", ["mlx-llava", *map(str, args)])
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        capfd.readouterr()
        with pytest.raises(SystemExit) as exit:
            main()
        out, err = capfd.readouterr()
        code = exit.value.code if isinstance(exit.value.code, int) else (0 if exit.value.code is None else 1)
        return subprocess.CompletedProcess(args, code, out, err)

    return run


def subprocess_cli(*args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "mlx_llava.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, **kw)


def assert_one_line_error(result, pattern=""):
    assert result.returncode not in (0, None), result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.splitlines()  # not stripped: a leading empty line counts
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert pattern in lines[0], lines[0]


def snapshot(folder: Path) -> dict:
    """Every file under `folder` -> its content's hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list:
    """Hidden temporary files or folders of ours (`.NAME.converting-*`, `.step-*.tmp`, ...)."""
    return [p for p in folder.rglob(".*") if p.name.startswith(".") and p.name != ".cache"]


# ---------------------------------------------------------------- data


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for name, rgb in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        image = Image.new("RGB", (40, 40), (255, 255, 255))
        image.paste(rgb, (8, 8, 32, 32))
        image.save(root / f"{name}.png")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def data(images):
    """Stage-2 records about the two images, and a set with no usable record."""
    records = [{"id": f"r{i}", "image": f"{c}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": c}]}
        for i, c in enumerate(["red", "blue"] * 3)]
    (images / "train.json").write_text(json.dumps(records))
    useless = [{"id": "a", "conversations": [{"from": "gpt", "value": "hi"}]},  # no human turn
               {"id": "b", "conversations": [{"from": "gpt", "value": "hello"}]},
               {"id": "c", "image": "missing.png", "conversations": records[0]["conversations"]}]
    (images / "useless.json").write_text(json.dumps(useless))
    return images


def train_args(model_dir, data, out, *extra):
    return ["train", "--stage", "2", "--model", model_dir, "--data", data / "train.json", "--image-folder", data,
            "--output", out, "--batch-size", "2", "--iters", "2", "--lora-rank", "4", "--lora-alpha", "8",
            "--save-every", "1", *extra]


@pytest.fixture(scope="module")
def run_dir(model_dir, data, tmp_path_factory):
    """A finished LoRA run with a checkpoint (step 1 of 2)."""
    from mlx_llava.train import TrainConfig, train

    out = tmp_path_factory.mktemp("run") / "run"
    train(TrainConfig(stage=2, model=str(model_dir), data=str(data / "train.json"), image_folder=str(data),
                      output=str(out), batch_size=2, iters=2, lora_rank=4, lora_alpha=8, save_every=1,
                      progress=False))
    assert (out / "checkpoints" / "step-00000001").is_dir()
    return out


# ---------------------------------------------------------------- 1. the conversation is lost


QUESTIONS = "What colour is the square?\nIs it a circle?\n"


def answers(stdout: str) -> list:
    """The REPL's answers: what follows each ">>" prompt (the help line comes first)."""
    return [part.strip() for part in stdout.split(">>")[1:] if part.strip()]


@pytest.mark.parametrize("bad,message", [
    ("/image {images}/missing.png", "image not found"),
    ("/image", "/image needs a path"),
    ("/image {images}", "cannot read image"),
    ("/image {images}/notes.txt", "cannot read image"),
    ("/bogus", "unknown command /bogus (commands: /image PATH, /reset, /quit)"),
])
def test_chat_survives_a_bad_command(cli, images, bad, message):
    """After a bad /image (or an unknown /command) the next answer is the one
    the conversation about the first image gives: nothing was cleared."""
    chat = ["chat", images / "red.png", "--max-tokens", "12"]
    first, second = QUESTIONS.splitlines()
    baseline = cli(*chat, stdin=QUESTIONS + "/quit\n")
    assert baseline.returncode == 0 and baseline.stderr == "", baseline.stderr
    result = cli(*chat, stdin=f"{first}\n{bad.format(images=images)}\n{second}\n/quit\n")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stdout
    assert answers(result.stdout) == answers(baseline.stdout) and len(answers(baseline.stdout)) == 2


@pytest.fixture(scope="module")
def demo():
    return mlx_llava.load(default_model())


@pytest.mark.parametrize("bad", [
    lambda chat, images: chat.reset(images / "missing.png"),
    lambda chat, images: chat.reset(images / "notes.txt"),
    lambda chat, images: chat.say("Again?", max_tokens=0),
    lambda chat, images: chat.say("Again?", image=images / "missing.png"),
    lambda chat, images: chat.say("Again?", temperature=-1),
    lambda chat, images: chat.say(None),
])
def test_chat_api_keeps_its_state_on_bad_input(demo, images, bad):
    model, processor = demo
    chat = mlx_llava.Chat(model, processor, images / "red.png")
    chat.say("What colour is the square?", max_tokens=8)
    state = (list(chat.messages), list(chat.images), len(chat.features), list(chat.tokens))
    with pytest.raises(LlavaError):
        bad(chat, images)
    assert (list(chat.messages), list(chat.images), len(chat.features), list(chat.tokens)) == state
    again = chat.say("Is it a circle?", max_tokens=8)
    fresh = mlx_llava.Chat(model, processor, images / "red.png")
    fresh.say("What colour is the square?", max_tokens=8)
    assert again == fresh.say("Is it a circle?", max_tokens=8)


# ---------------------------------------------------------------- 2. the source is destroyed


@pytest.fixture
def source(model_dir, tmp_path):
    src = tmp_path / "src" / "llava"
    shutil.copytree(model_dir, src)
    (tmp_path / "link").symlink_to(src)
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    (adapters / "adapter_config.json").write_text("{}")
    return src


@pytest.mark.parametrize("args,pattern", [
    (["convert", "--hf", "{src}", "--mlx-path", "{src}", "--force"], "is the source"),
    (["convert", "--hf", "{src}", "--mlx-path", "{tmp}/link", "--force"], "is the source"),
    (["convert", "--hf", "{tmp}/link", "--mlx-path", "{src}/../llava/", "--force"], "is the source"),
    (["convert", "--hf", "{src}", "--mlx-path", "{src}/mlx"], "lies inside the source"),
    (["convert", "--hf", "{src}", "--mlx-path", "{tmp}/src", "--force"], "contains the source"),
    (["convert", "--hf", "org/x", "--vision-tower", "{src}", "--mlx-path", "{src}", "--force"], "is the source"),
    (["fuse", "--model", "{src}", "--adapters", "{tmp}/adapters", "--output", "{src}"], "is the source"),
    (["fuse", "--model", "{src}", "--adapters", "{tmp}/adapters", "--output", "{tmp}/adapters"], "is the source"),
    (["fuse", "--model", "{src}", "--adapters", "{tmp}/adapters", "--output", "{src}/fused"], "lies inside"),
    (["train", "--stage", "1", "--model", "{src}", "--data", "x.json", "--output", "{src}"], "is the source"),
    (["train", "--stage", "2", "--model", "{tmp}/link", "--data", "x.json", "--output", "{tmp}/src"], "contains"),
    (["train", "--stage", "2", "--model", "{src}", "--data", "x.json", "--output", "{src}/run"], "lies inside"),
])
def test_an_output_never_overwrites_its_source(cli, source, tmp_path, args, pattern):
    before = snapshot(source)
    result = cli(*[a.format(src=source, tmp=tmp_path) for a in args])
    assert_one_line_error(result, pattern)
    assert snapshot(source) == before
    assert not leftovers(tmp_path)


# ---------------------------------------------------------------- 3. a finished run that cannot be used


@pytest.mark.parametrize("change,pattern", [
    ({"--lora-rank": "8"}, "--lora-rank 4, this run with --lora-rank 8"),
    ({"--lora-layers": "1"}, "--lora-layers 2, this run with --lora-layers 1"),
    ({"--qlora": None}, "--lora, this run with --qlora"),
    ({"--full": None}, "--lora, this run with --full"),
    ({"--model": "other"}, "--model"),
    ({"--lora-rank": "8", "old": None}, "--lora-rank 4"),  # a checkpoint from before settings were recorded
])
def test_resume_with_other_settings_is_refused(cli, model_dir, data, run_dir, tmp_path, change, pattern):
    """The run folder is left as it was: its adapters still fit its checkpoints."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    shutil.copytree(model_dir, tmp_path / "other")
    args = train_args(model_dir, data, run, "--resume", "--iters", "3")
    for flag, value in change.items():
        if flag == "old":
            state = run / "checkpoints" / "step-00000001" / "state.json"
            edit_json(state, lambda s: s.pop("settings"))
        elif flag in args:
            args[args.index(flag) + 1] = tmp_path / value if flag == "--model" else value
        else:
            args += [flag] + ([value] if value else [])
    before = snapshot(run)
    assert_one_line_error(cli(*args), pattern)
    assert snapshot(run) == before


def test_resume_with_the_same_settings_goes_on(cli, model_dir, data, run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    result = cli(*train_args(model_dir, data, run, "--resume", "--iters", "3"))
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stdout and not leftovers(run)


# ---------------------------------------------------------------- 4. half-written folders

SLOW_CONVERT = """
import sys, time
from mlx_llava.convert import writer

write = writer.write

def slow(tmp, items, shard_bytes, on_tensor=None):
    def tick(*a):
        if on_tensor:
            on_tensor(*a)
        time.sleep(0.05)
    return write(tmp, items, shard_bytes, tick)

writer.write = slow
from mlx_llava.cli import main
sys.argv = ["mlx-llava", "convert", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_mid_conversion_leaves_nothing(model_dir, tmp_path, signum):
    """A real `mlx-llava convert`, slowed to 50 ms a tensor, killed once its
    temporary folder holds a shard being written."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, "--hf", model_dir, "--mlx-path", out],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any(p.is_dir() and any(p.iterdir()) for p in tmp_path.glob(".out.converting-*")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert_one_line_error(result, f"stopped by {signal.Signals(signum).name}")
    assert result.returncode == 128 + signum
    assert not out.exists() and not leftovers(tmp_path)


def test_stale_temporary_folders_are_removed_and_only_those(cli, model_dir, tmp_path):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)
    stale = tmp_path / f".out.converting-{dead}-k1ll3d"
    old = tmp_path / ".out.converting-x7q2ab9c"  # the name before pids were in it
    alive = tmp_path / f".out.converting-{os.getpid()}-busy"  # a conversion still running
    others = [tmp_path / ".out.mine", tmp_path / f".other.converting-{dead}-x"]
    for folder in [stale, old, alive, *others]:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    os.utime(old, (time.time() - 3 * 86400,) * 2)
    result = cli("convert", "--hf", model_dir, "--mlx-path", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert not stale.exists() and not old.exists()
    assert alive.exists() and all(p.exists() for p in others)


@pytest.mark.parametrize("fault", ["mlx write", "state.json"])
def test_a_full_disk_while_saving_a_checkpoint(cli, model_dir, data, tmp_path, monkeypatch, fault):
    """As MLX fails on a full disk (measured on a 200 KB tmpfs: a part of the
    file written, then RuntimeError "[write] Unable to write ..."), or as
    Python does (OSError ENOSPC)."""
    import mlx.core as mx

    if fault == "mlx write":
        real = mx.save_safetensors

        def full(path, arrays, *a, **k):
            if ".step-" in str(path):
                Path(path).write_bytes(b"\0" * 64)
                raise RuntimeError("[write] Unable to write 4096 bytes to file.")
            return real(path, arrays, *a, **k)

        monkeypatch.setattr(mx, "save_safetensors", full)
    else:
        real = Path.write_text

        def full(self, *a, **k):
            if self.name == "state.json":
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(self, *a, **k)

        monkeypatch.setattr(Path, "write_text", full)
    out = tmp_path / "run"
    result = cli(*train_args(model_dir, data, out))
    assert_one_line_error(result, "cannot write checkpoint")
    assert not leftovers(out) and not list((out / "checkpoints").glob("step-*"))


@pytest.mark.parametrize("flag,value", [("--save-every", "0"), ("--keep", "0"), ("--iters", "0")])
def test_a_run_that_would_keep_no_weights_is_refused_before_it_starts(cli, model_dir, data, tmp_path, flag, value):
    result = cli(*train_args(model_dir, data, tmp_path / "run", flag, value))
    assert_one_line_error(result, flag)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 5. tracebacks instead of one line


def edit_json(path: Path, change):
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


MODEL_FAULTS = {
    "hidden_size a string": ("config.json", lambda c: c["text_config"].update(hidden_size="64"),
                             "text_config.hidden_size must be a positive integer"),
    "vision_config a list": ("config.json", lambda c: c.update(vision_config=[]), "vision_config must be an object"),
    "image token a string": ("config.json", lambda c: c.update(image_token_index="x"), "image_token_index"),
    "rms_norm_eps a string": ("config.json", lambda c: c["text_config"].update(rms_norm_eps="x"), "config.json"),
    "unknown projector": ("config.json", lambda c: c.update(projector_type="mlp3x"), "projector_type"),
    "config a list": ("config.json", "[]", "must hold a JSON object"),
    "config not JSON": ("config.json", "{oops", "config.json is not valid JSON"),
    "preprocessor not JSON": ("preprocessor_config.json", "{oops", "preprocessor_config.json is not valid JSON"),
    "preprocessor wrong size": ("preprocessor_config.json",
                                lambda p: p.update(crop_size={"height": 336, "width": 336}),
                                "crop_size 336x336 does not match the vision tower's image_size 28"),
    "preprocessor mean": ("preprocessor_config.json", lambda p: p.update(image_mean=[0.5]), "image_mean"),
}


@pytest.mark.parametrize("fault", MODEL_FAULTS)
def test_a_broken_model_directory_is_one_line_naming_file_and_field(cli, model_dir, images, tmp_path, fault):
    name, change, pattern = MODEL_FAULTS[fault]
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    if isinstance(change, str):
        (model / name).write_text(change)
    else:
        edit_json(model / name, change)
    result = cli("generate", "--model", model, "--image", images / "red.png", "-p", "What is it?", "--max-tokens", "2")
    assert_one_line_error(result, pattern)
    assert name in result.stderr


def test_a_missing_preprocessor_config_follows_the_vision_tower(cli, model_dir, images, tmp_path):
    """Decided: without preprocessor_config.json, CLIP's preprocessing at the
    vision tower's own image_size (not 336-px defaults that crash the tower)."""
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    (model / "preprocessor_config.json").unlink()
    _, processor = mlx_llava.load(model)
    assert processor.image_config.crop_size == (28, 28)
    result = cli("generate", "--model", model, "--image", images / "red.png", "-p", "What is it?", "--max-tokens", "2")
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize("args,pattern", [
    (["generate", "-p", "hi", "--max-tokens", "0"], "--max-tokens must be a positive number"),
    (["generate", "-p", "hi", "--seed", "-1"], "--seed"),
    (["generate", "-p", "hi", "--repetition-penalty", "-5"], "--repetition-penalty"),
    (["generate", "-p", "hi", "--max-tokens", "many"], "Invalid value for '--max-tokens'"),
    (["generate", "-p", "hi", "--image", "{images}"], "cannot read image"),
    (["generate", "-p", "hi", "--conv-mode", "nope"], "unknown conv mode 'nope'"),
    (["generate", "--max-tokens", "2"], "Missing option '--prompt'"),
    (["chat", "--seed", "-1"], "--seed"),
    (["eval", "heldout", "--max-tokens", "0"], "--max-tokens must be at least 1"),
    (["eval", "heldout", "--data", "{images}"], "Is a directory"),
    (["eval", "heldout", "--answers", "{images}/notes.txt/a.json"], "is a file, not a folder"),
    (["convert", "--hf", "{model}", "--mlx-path", "{images}/notes.txt/out"], "is a file, not a folder"),
    (["convert", "--hf", "{model}", "--mlx-path", "{images}/notes.txt", "--force"], "is a file, not a folder"),
    (["convert", "--hf", "{images}/nothing", "--mlx-path", "{tmp}/out"], "model not found"),
    (["train", "--stage", "2", "--model", "{model}", "--data", "{images}", "--output", "{tmp}/o"], "is a folder"),
    (["train", "--stage", "2", "--model", "{model}", "--data", "{images}/useless.json", "--batch-size", "2",
      "--output", "{tmp}/o"], "skipped 3: 2 no question (human turn), 1 image not found"),
    (["train", "--stage", "2", "--model", "{model}", "--data", "{images}/train.json", "--output", "{tmp}/o",
      "--batch-size", "0"], "--batch-size must be at least 1"),
    (["train", "--stage", "2", "--model", "{model}", "--data", "{images}/train.json", "--output", "{tmp}/o",
      "--lora-rank", "0"], "--lora-rank must be at least 1"),
    (["train", "--stage", "2", "--model", "{model}", "--data", "{images}/train.json", "--output", "{tmp}/o",
      "--grad-accum", "0"], "--grad-accum must be at least 1"),
    (["train", "--stage", "2", "--model", "{model}", "--data", "{images}/train.json", "--output", "{tmp}/o",
      "--epochs", "0"], "--epochs must be more than 0"),
    (["train", "--stage", "2", "--model", "{model}", "--data", "{images}/train.json", "--output", "{tmp}/o",
      "--keep", "-1"], "--keep must be at least 1"),
    (["train", "--stage", "2", "--model", "{model}", "--data", "{images}/train.json", "--output", "{tmp}/o",
      "--image-folder", "{images}/nowhere"], "--image-folder"),
    (["train", "--stage", "2", "--model", "{model}", "--data", "{images}/train.json", "--output", "{tmp}/o",
      "--image-folder", "{images}", "--batch-size", "2", "--lora-layers", "9"], "the language model has 2 blocks"),
    (["train", "--config", "{images}"], "is not a YAML file"),
    (["train", "--config", "{tmp}/bad.yaml", "--model", "{model}"], "--batch-size must be an integer, not 'two'"),
    (["train", "--stage", "3"], "missing --data, --output"),
])
def test_a_bad_option_is_one_line(cli, model_dir, images, data, tmp_path, args, pattern):
    (tmp_path / "bad.yaml").write_text(f"stage: 2\ndata: {images}/train.json\noutput: {tmp_path}/o\nbatch_size: two\n")
    args = [a.format(model=model_dir, images=images, tmp=tmp_path) for a in args]
    assert_one_line_error(cli(*args), pattern)
    assert not (tmp_path / "o").exists() and not (tmp_path / "out").exists() and not leftovers(tmp_path)


# ---------------------------------------------------------------- 6. accepted nonsense


@pytest.mark.parametrize("args,pattern", [
    (["generate", "-p", "hi", "--temperature", "-1"], "--temperature"),
    (["generate", "-p", "hi", "--top-p", "2"], "--top-p"),
    (["generate", "-p", "hi", "--top-p", "-1"], "--top-p"),
    (["generate", "-p", "hi", "--top-p", "0"], "--top-p"),
    (["chat", "--temperature", "-0.5"], "--temperature"),
    (["convert", "--hf", "{model}", "--mlx-path", "{tmp}/out", "--q-bits", "3"], "need -q"),
    (["convert", "--hf", "{model}", "--mlx-path", "{tmp}/out", "--q-bits", "8"], "need -q"),
    (["convert", "--hf", "{model}", "--mlx-path", "{tmp}/out", "--q-group-size", "32"], "need -q"),
    (["convert", "--hf", "{model}", "--mlx-path", "{tmp}/out", "--quantize-vision"], "need -q"),
    (["convert", "--hf", "{model}", "--mlx-path", "{tmp}/out", "-q", "--q-bits", "3"], "--q-bits must be one of 4, 8"),
    (["fuse", "--model", "{model}", "--adapters", "{tmp}", "--output", "{tmp}/out", "--q-bits", "8"], "need -q"),
    (["train", "--stage", "2", "--model", "{model}", "--data", "{images}/train.json", "--output", "{tmp}/out",
      "--learning-rate", "-1"], "--learning-rate must be more than 0"),
    (["train", "--stage", "2", "--model", "{model}", "--data", "{images}/train.json", "--output", "{tmp}/out",
      "--warmup-ratio", "1.5"], "--warmup-ratio"),
    (["train", "--stage", "1", "--lora", "--model", "{model}", "--data", "{images}/train.json",
      "--output", "{tmp}/out"], "stage 1 trains the projector alone"),
])
def test_nonsense_is_refused(cli, model_dir, data, images, tmp_path, args, pattern):
    args = [a.format(model=model_dir, images=images, tmp=tmp_path) for a in args]
    assert_one_line_error(cli(*args), pattern)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_q_options_work_with_q(cli, model_dir, run_dir, tmp_path):
    """Decided: q options without -q are refused (above), never implied;
    with -q they apply, and without them fuse writes float weights."""
    plain = cli("fuse", "--model", model_dir, "--adapters", run_dir, "--output", tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr
    assert "quantization" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    q = cli("fuse", "--model", model_dir, "--adapters", run_dir, "--output", tmp_path / "q", "-q",
            "--q-group-size", "32")
    assert q.returncode == 0, q.stderr
    quantization = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert (quantization["bits"], quantization["group_size"]) == (4, 32)


def test_max_tokens_minus_one_stops_at_the_context(images):
    """Decided: -1 means "until the answer ends or the context is full"; a
    model that never ends its answer stops at the context, not never."""
    model, processor = mlx_llava.load(default_model())
    processor.tokenizer.eos_token_ids = []  # this model now never ends an answer
    processor.context_length = 120
    responses = list(mlx_llava.stream_generate(model, processor, "Describe the image.", images / "red.png",
                                               max_tokens=-1))
    last = responses[-1]
    assert last.finish_reason == "length"
    assert last.prompt_tokens + last.generation_tokens == processor.context_length


# ---------------------------------------------------------------- 7. messages that drown the user


@pytest.mark.parametrize("fault,pattern", [
    ("no text_config", "text_config is missing"),
    ("empty text_config", "text_config must be a non-empty object"),
    ("sparse text_config", "no text_config.hidden_size: LLaMA-7B's sizes assumed"),
    ("no vision_config", "no vision_config.hidden_size"),
    ("no tokenizer", "has no tokenizer"),
    ("broken tokenizer", "cannot load the tokenizer"),
    ("prompt too long", "too long for the model's context of 512 tokens"),
])
def test_one_short_line_naming_the_cause(cli, model_dir, tmp_path, fault, pattern):
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    config = model / "config.json"
    prompt = "What is it?"
    if fault == "no text_config":
        edit_json(config, lambda c: c.pop("text_config"))
    elif fault == "empty text_config":
        edit_json(config, lambda c: c.update(text_config={}))
    elif fault == "sparse text_config":
        edit_json(config, lambda c: c.update(text_config={"model_type": "llama"}))
    elif fault == "no vision_config":
        edit_json(config, lambda c: c.pop("vision_config"))
    elif fault == "no tokenizer":
        for f in model.glob("tokenizer*"):
            f.unlink()
    elif fault == "broken tokenizer":
        (model / "tokenizer.json").write_text("{")
    else:  # the demo model's tokenizer would warn past its model_max_length (2048) first
        model, prompt = default_model(), "the star " * 1500
    result = cli("generate", "--model", model, "-p", prompt, "--max-tokens", "2")
    assert_one_line_error(result, pattern)
    assert len(result.stderr) < 600 and "sentencepiece" not in result.stderr


def test_an_unreachable_hub_fails_fast_and_quietly(tmp_path):
    """No network (a hub endpoint that refuses connections): one line, no
    retries (huggingface-hub's listing retries five times over 30 s)."""
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    proc = subprocess_cli("convert", "--hf", "some-org/some-llava", "--mlx-path", tmp_path / "out", env=env)
    stdout, stderr = proc.communicate(timeout=120)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert_one_line_error(result, "model not found: some-org/some-llava")
    assert "Retrying" not in stderr and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 8. startup

STARTUP = """
import json, sys
from mlx_llava.cli import main

heavy = ("mlx_lm", "transformers", "torch", "mlx.core", "mlx_llava.train.trainer", "mlx_llava.generate")
seen = {}
for args in json.loads(sys.argv[1]):
    sys.argv = ["mlx-llava", *args]
    try:
        main()
    except SystemExit as e:
        seen[" ".join(args)] = [e.code, sorted(m for m in heavy if m in sys.modules)]
print(json.dumps(seen))
"""


def test_help_and_option_errors_import_nothing_heavy(model_dir, tmp_path):
    """`--help` and option errors are instant: they import neither mlx-lm,
    transformers, torch nor mlx itself (checked in a fresh interpreter)."""
    cases = [["--help"], ["generate", "--help"], ["train", "--help"], ["convert", "--help"],
             ["generate", "-p", "x", "--max-tokens", "0"], ["chat", "--top-p", "2"],
             ["generate", "-p", "x", "--conv-mode", "nope"],
             ["convert", "--hf", str(model_dir), "--mlx-path", str(model_dir), "--force"],
             ["convert", "--hf", str(model_dir), "--mlx-path", str(tmp_path / "o"), "--dtype", "int8"],
             ["train", "--stage", "2", "--model", str(model_dir), "--data", "d.json", "--output", str(tmp_path / "o"),
              "--batch-size", "0"],
             ["fuse", "--model", str(model_dir), "--adapters", str(tmp_path), "--output", str(model_dir)]]
    done = subprocess.run([sys.executable, "-c", STARTUP, json.dumps(cases)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    assert len(seen) == len(cases)
    for args, (code, heavy) in seen.items():
        assert heavy == [], (args, heavy)
        assert code == (0 if "--help" in args else 1), (args, code)
    assert "Traceback" not in done.stderr


def test_import_mlx_llava_is_light_and_the_api_still_there():
    code = ("import sys, mlx_llava; heavy = [m for m in ('mlx_lm', 'transformers', 'mlx_llava.train.trainer') "
            "if m in sys.modules]; from mlx_llava import load, generate, stream_generate, Chat, train, LlavaError; "
            "import mlx_llava.generate, mlx_llava.train.config; "
            "print(heavy, callable(mlx_llava.generate), callable(mlx_llava.train), Chat.__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "True", "True", "Chat"]


CTRL_C_WHILE_IMPORTING = """
import sys

class CtrlC:  # Ctrl-C arriving while the command's modules load
    def find_spec(self, name, path=None, target=None):
        if name == "typer":
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, CtrlC())
sys.argv = ["mlx-llava", "generate", "-p", "hi"]
from mlx_llava.cli import main
main()
"""


def test_ctrl_c_during_startup_is_no_traceback():
    done = subprocess.run([sys.executable, "-c", CTRL_C_WHILE_IMPORTING], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130
    assert "Traceback" not in done.stderr and done.stderr.strip() == "", done.stderr


# ---------------------------------------------------------------- the Python API


def api_cases():
    """(name, call(model, processor, paths) that must raise LlavaError)."""
    from mlx_llava.adapters import fuse
    from mlx_llava.convert import convert
    from mlx_llava.train import TrainConfig, train

    def cfg(p, **kw):
        return dict(dict(stage=2, model=str(p["model"]), data=str(p["data"] / "train.json"),
                         output=str(p["tmp"] / "out"), image_folder=str(p["data"])), **kw)

    gen = mlx_llava.generate
    return {
        "load a missing folder": lambda m, pr, p: mlx_llava.load(p["tmp"] / "nothing"),
        "load a number": lambda m, pr, p: mlx_llava.load(7),
        "load a file": lambda m, pr, p: mlx_llava.load(p["data"] / "red.png"),
        "load a folder with no model": lambda m, pr, p: mlx_llava.load(p["data"]),
        "load missing adapters": lambda m, pr, p: mlx_llava.load(p["model"], adapter_path=p["tmp"]),
        "max_tokens 0": lambda m, pr, p: gen(m, pr, "hi", max_tokens=0),
        "max_tokens -2": lambda m, pr, p: gen(m, pr, "hi", max_tokens=-2),
        "max_tokens a float": lambda m, pr, p: gen(m, pr, "hi", max_tokens=2.5),
        "temperature -1": lambda m, pr, p: gen(m, pr, "hi", temperature=-1),
        "temperature nan": lambda m, pr, p: gen(m, pr, "hi", temperature=float("nan")),
        "top_p 2": lambda m, pr, p: gen(m, pr, "hi", top_p=2),
        "seed -1": lambda m, pr, p: gen(m, pr, "hi", seed=-1),
        "repetition_penalty -1": lambda m, pr, p: gen(m, pr, "hi", repetition_penalty=-1),
        "prompt None": lambda m, pr, p: gen(m, pr, None),
        "image missing": lambda m, pr, p: gen(m, pr, "hi", image=p["data"] / "missing.png"),
        "image not an image": lambda m, pr, p: gen(m, pr, "hi", image=p["data"] / "notes.txt"),
        "image a number": lambda m, pr, p: gen(m, pr, "hi", image=42),
        "conv_mode unknown": lambda m, pr, p: gen(m, pr, "hi", conv_mode="nope"),
        "Chat on a missing image": lambda m, pr, p: mlx_llava.Chat(m, pr, p["data"] / "missing.png"),
        "TrainConfig batch_size 0": lambda m, pr, p: TrainConfig(**cfg(p, batch_size=0)),
        "TrainConfig lr a word": lambda m, pr, p: TrainConfig(**cfg(p, learning_rate="fast")),
        "TrainConfig output is the model": lambda m, pr, p: TrainConfig(**cfg(p, output=str(p["model"]))),
        "train on a folder": lambda m, pr, p: train(**cfg(p, data=str(p["data"]))),
        "train with no usable record": lambda m, pr, p: train(**cfg(p, data=str(p["data"] / "useless.json"),
                                                                    batch_size=1, progress=False)),
        "convert onto its source": lambda m, pr, p: convert(str(p["model"]), str(p["model"]), force=True),
        "convert to no path": lambda m, pr, p: convert(str(p["model"]), None),
        "convert q_bits without quantize": lambda m, pr, p: convert(str(p["model"]), str(p["tmp"] / "o"), q_bits=8),
        "convert q_bits 3": lambda m, pr, p: convert(str(p["model"]), str(p["tmp"] / "o"), quantize=True, q_bits=3),
        "fuse onto the model": lambda m, pr, p: fuse(p["model"], p["tmp"], p["model"]),
        "fuse bits 3": lambda m, pr, p: fuse(p["model"], p["tmp"], p["tmp"] / "o", bits=3),
    }


@pytest.mark.parametrize("case", list(api_cases()))
def test_the_python_api_raises_llava_error(demo, model_dir, data, tmp_path, case):
    model, processor = demo
    paths = {"model": model_dir, "data": data, "tmp": tmp_path}
    before = snapshot(model_dir)
    with pytest.raises(LlavaError):
        api_cases()[case](model, processor, paths)
    assert snapshot(model_dir) == before and not leftovers(tmp_path)
