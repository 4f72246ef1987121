"""A LLaMA-style tokenizer trained on the synthetic world's text.

BPE over "▁"-prefixed words with byte fallback, <unk>/<s>/</s> at ids
0/1/2, a BOS added to every text and `<image>` registered as a special
token: the same behaviour as Vicuna's SentencePiece tokenizer, so the
templates, the target masks and mlx-lm's streaming detokenizer all work on it
as on the real thing.
"""

from pathlib import Path

from ..conversation import IMAGE_PLACEHOLDER

SPECIALS = ["<unk>", "<s>", "</s>"]
BYTES = [f"<0x{i:02X}>" for i in range(256)]


def train_tokenizer(texts, vocab_size: int, path, phrases=()) -> Path:
    """Train on `texts` and save a transformers tokenizer directory at `path`.

    Merges stay within words, except inside `phrases`: fixed strings (the
    chat template's system message, the short-answer instruction) that BPE
    may merge into a single token, so that every conversation does not pay
    for them token by token (they were 60% of a conversation's tokens).
    """
    import re

    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    if phrases:
        fixed = "|".join("▁?" + re.escape(p.replace(" ", "▁")) for p in sorted(phrases, key=len, reverse=True))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(f"{fixed}|▁?[^▁\\n]+|\\n"), behavior="isolated")
    else:
        tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS + BYTES, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>", model_max_length=2048)
    wrapped.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
    wrapped.save_pretrained(str(path))
    return Path(path)
