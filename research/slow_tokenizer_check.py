"""Check tests/reference_llava.py's restated slow LlamaTokenizer against transformers 4.37.2 itself.

The original LLaVA pins transformers 4.37.2 and tokenizes with its slow,
sentencepiece LlamaTokenizer; transformers 5 no longer has that class, so the
tests restate it. This script trains the tests' sentencepiece model, runs the
real 4.37.2 tokenizer in a side environment and the restatement here, on
strings that hit every branch (leading spaces, special tokens, "▁" in text),
for legacy and non-legacy configs, and reports any difference.

    python3 -m venv /tmp/t437 && /tmp/t437/bin/pip install "transformers==4.37.2" "tokenizers<0.19" sentencepiece protobuf
    python research/slow_tokenizer_check.py --t437-python /tmp/t437/bin/python
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

STRINGS = [
    "", " ", "  ", "A chat between a curious human", " ASSISTANT: A red circle.</s>USER: Where?",
    " ASSISTANT:", "\nWhat is in the image? ASSISTANT:", "  two spaces caption\n", "caption\n", " caption\n",
    "[INST] <<SYS>>\nYou are a helpful language and vision assistant.\n<</SYS>>\n\n",
    " [/INST] A red circle. </s><s>[INST] Where? [/INST]", "hello </s> world", "a</s> b", "a</s>  b",
    "<s> leading", "<s>leading", "</s>", " </s>", "1234 and 56", "héllo 😀 ünïcode",
    "USER: What is in the image? ASSISTANT: A red circle.</s>USER: Where is the star? ASSISTANT: top.</s>",
    "\n", "\n\n x", "▁already", " ▁x", "tab\there", "end with space ",
]

SLOW = """
import json, sys
from transformers import AutoTokenizer
folder, strings = sys.argv[1], json.loads(sys.argv[2])
out = {}
for legacy in (True, False):
    t = AutoTokenizer.from_pretrained(f"{folder}/legacy{int(legacy)}", use_fast=False)
    assert type(t).__name__ == "LlamaTokenizer" and t.legacy == legacy
    out[str(legacy)] = [t(s).input_ids for s in strings]
print(json.dumps(out))
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--t437-python", required=True, help="python of an environment with transformers 4.37.2")
    args = parser.parse_args()
    from conftest import make_tokenizer
    from reference_llava import SlowLlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model = make_tokenizer(Path(tmp) / "tok") / "_spm" / "tokenizer.model"
        for legacy in (True, False):
            d = Path(tmp) / f"legacy{int(legacy)}"
            d.mkdir()
            (d / "tokenizer.model").write_bytes(model.read_bytes())
            (d / "tokenizer_config.json").write_text(json.dumps({
                "tokenizer_class": "LlamaTokenizer", "legacy": legacy, "add_bos_token": True,
                "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
        real = json.loads(subprocess.run([args.t437_python, "-c", SLOW, tmp, json.dumps(STRINGS)],
                                         capture_output=True, text=True, check=True).stdout)
        bad = 0
        for legacy in (True, False):
            ours = SlowLlamaTokenizer(model, legacy)
            for s, want in zip(STRINGS, real[str(legacy)]):
                if ours(s) != want:
                    bad += 1
                    print(f"legacy={legacy} {s!r}: transformers 4.37.2 {want}, restated {ours(s)}")
        print(f"{2 * len(STRINGS) - bad}/{2 * len(STRINGS)} strings tokenized alike")
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
