"""The `mlx-llava` command as a user runs it: one-line errors, never a traceback."""

import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "mlx_llava.cli", *map(str, args)],
                          input=stdin, capture_output=True, text=True, timeout=300)


def assert_one_line_error(result, pattern):
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert pattern in lines[0], lines[0]


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "red.png"
    Image.new("RGB", (30, 20), (220, 20, 20)).save(path)
    return path


def test_generate_prints_an_answer(model_dir, picture):
    result = run("generate", "--model", model_dir, "--image", picture, "-p", "What is it?",
                 "--max-tokens", "4", "--verbose")
    assert result.returncode == 0, result.stderr
    assert "tok/s" in result.stdout and "peak memory" in result.stdout


def test_missing_model(tmp_path, picture):
    assert_one_line_error(run("generate", "--model", tmp_path / "nope", "-p", "hi"), "model not found")


def test_missing_image(model_dir, tmp_path):
    result = run("generate", "--model", model_dir, "--image", tmp_path / "nope.png", "-p", "hi")
    assert_one_line_error(result, "image not found")


def test_unreadable_image(model_dir, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    assert_one_line_error(run("generate", "--model", model_dir, "--image", bad, "-p", "hi"),
                          "cannot read image")


@pytest.mark.parametrize("field,value,message", [
    ("model_type", "blip_2", "unknown architecture 'blip_2'"),
    ("text_config.model_type", "no_such_lm", "unknown language model architecture 'no_such_lm'"),
])
def test_unknown_architecture(model_dir, tmp_path, field, value, message):
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    if "." in field:
        config["text_config"]["model_type"] = value
    else:
        config[field] = value
    (copy / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run("generate", "--model", copy, "-p", "hi"), message)


def test_prompt_too_long(model_dir):
    result = run("generate", "--model", model_dir, "-p", "the star " * 300)
    assert_one_line_error(result, "too long for the model's context")


def test_chat_repl(model_dir, picture, tmp_path):
    script = f"What is it?\n/image {tmp_path / 'missing.png'}\nAnd now?\n/reset\n/image {picture}\nColour?\n/quit\n"
    result = run("chat", picture, "--model", model_dir, "--max-tokens", "3", "--verbose", stdin=script)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "image not found" in result.stderr  # the bad /image is reported, the REPL goes on
    assert result.stdout.count("peak memory") == 3
    assert "(conversation cleared)" in result.stdout and "(new conversation about" in result.stdout
