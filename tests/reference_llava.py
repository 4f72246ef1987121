"""The original LLaVA's text rules, restated for tests (none of its code is copied).

- `SlowLlamaTokenizer`: transformers 4.37's slow, sentencepiece
  `LlamaTokenizer`, which the original loads with `use_fast=False`: the text
  is split on added tokens; each piece goes through sentencepiece; with
  `legacy` every piece gets sentencepiece's "▁" prefix, without it only the
  start of the text does (and a piece that starts with a space is encoded
  after an "<unk>" that is then dropped, so that no prefix is added to it).
  research/slow_tokenizer_check.py checks this restatement against
  transformers 4.37.2 itself.
- `tokenizer_image_token`, `prompt_two` / `prompt_llama_2` (`get_prompt`),
  `preprocess_v1`, `preprocess_llama_2` and `preprocess_plain` as
  llava/mm_utils.py and llava/train/train.py define them.
"""

import math
import re

IGNORE_INDEX = -100
IMAGE_INDEX = -200  # the original's IMAGE_TOKEN_INDEX


class SlowLlamaTokenizer:
    def __init__(self, model_file, legacy: bool, added=()):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb2

        self.legacy = legacy
        proto = pb2.ModelProto()
        proto.ParseFromString(open(model_file, "rb").read())
        if not legacy:  # the slow tokenizer turns the dummy prefix off and adds "▁" itself
            proto.normalizer_spec.add_dummy_prefix = False
        self.sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.bos_token_id, self.eos_token_id = self.sp.bos_id(), self.sp.eos_id()
        self.specials = {"<unk>": self.sp.unk_id(), "<s>": self.bos_token_id, "</s>": self.eos_token_id}
        self.added = dict(self.specials)
        for token in added:
            self.added[token] = self.sp.get_piece_size() + len(self.added) - len(self.specials)
        # Tokens added as special (add_tokens(..., special_tokens=True), as the original adds
        # its image tokens and as Yi's ChatML markers are) join the special tokens, so a text
        # that starts with one gets no "▁" without `legacy`. (Assumed from transformers >= 4.34's
        # _add_tokens; research/slow_tokenizer_check.py checked the restatement without them.)
        self.specials = dict(self.added)
        self.unk_length = len(self.sp.encode("<unk>", out_type=str))

    def _tokenize(self, text):
        if self.legacy or not text.startswith(("▁", " ")):
            return self.sp.encode(text, out_type=str)
        return self.sp.encode("<unk>" + text, out_type=str)[self.unk_length:]

    def tokenize(self, text):
        if not self.legacy and text:
            text = "▁" + text.replace("▁", " ")
        pattern = "(" + "|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True)) + ")"
        tokens = []
        for part in re.split(pattern, text):
            if part in self.added:
                tokens.append(part)
            elif part:
                tokens += self._tokenize(part)
        if not self.legacy and len(tokens) > 1 and tokens[0] == "▁" and tokens[1] in self.specials:
            tokens = tokens[1:]
        return tokens

    def __call__(self, text):
        ids = [self.added[t] if t in self.added else self.sp.piece_to_id(t) for t in self.tokenize(text)]
        return [self.bos_token_id] + ids


def tokenizer_image_token(prompt, tokenizer, image_index=IMAGE_INDEX):
    chunks = [tokenizer(c) for c in prompt.split("<image>")]
    offset = 1 if chunks[0][:1] == [tokenizer.bos_token_id] else 0
    ids = chunks[0][:offset]
    # The original puts [image] * (offset + 1) between the chunks and then
    # drops `offset` ids from the front of every item, separators included.
    for k, chunk in enumerate(chunks):
        if k:
            ids += ([image_index] * (offset + 1))[offset:]
        ids += chunk[offset:]
    return ids


def multimodal(value):
    """preprocess_multimodal on one turn."""
    if "<image>" in value:
        value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
    return value


def prompt_two(system, turns, sep=" ", sep2="</s>", roles=("USER", "ASSISTANT")):
    out = system + sep
    for i, value in enumerate(turns):
        out += f"{roles[i % 2]}: {value}" + (sep, sep2)[i % 2]
    return out


def prompt_llama_2(system, turns, sep="<s>", sep2="</s>"):
    out = ""
    for i, value in enumerate(turns):
        if i == 0 and system:
            value = f"<<SYS>>\n{system}\n<</SYS>>\n\n{value}"
        out += f"{sep}[INST] {value} [/INST]" if i % 2 == 0 else f" {value} {sep2}"
    return out.lstrip(sep)


def _mask_rounds(prompt, tokenizer, sep2, answer_sep, shift, has_image):
    encode = (lambda t: tokenizer_image_token(t, tokenizer)) if has_image else tokenizer
    ids = encode(prompt)
    target = list(ids)
    cur = 1
    target[:cur] = [IGNORE_INDEX]
    for i, rou in enumerate(prompt.split(sep2)):
        if rou == "":
            break
        parts = rou.split(answer_sep)
        if len(parts) != 2:
            break
        round_len = len(encode(rou))
        instruction_len = len(encode(parts[0] + answer_sep)) - 2
        if i != 0:
            round_len -= shift
            instruction_len -= shift
        target[cur:cur + instruction_len] = [IGNORE_INDEX] * len(target[cur:cur + instruction_len])
        cur += round_len
    target[cur:] = [IGNORE_INDEX] * len(target[cur:])
    if cur != len(ids):
        target = [IGNORE_INDEX] * len(ids)
    return ids, target


def preprocess_v1(prompt, tokenizer, has_image):
    """Masks of preprocess_v1 with tokenizers >= 0.14: rounds after the first
    lose one token when the tokenizer is not legacy."""
    return _mask_rounds(prompt, tokenizer, "</s>", " ASSISTANT: ", 0 if tokenizer.legacy else 1, has_image)


def preprocess_llama_2(prompt, tokenizer, has_image):
    return _mask_rounds(prompt, tokenizer, "</s>", "[/INST] ", 0, has_image)


def prompt_mpt(system, turns, sep="<|im_end|>", roles=("<|im_start|>user\n", "<|im_start|>assistant\n")):
    out = system + sep
    for i, value in enumerate(turns):
        out += roles[i % 2] + value + sep
    return out


def preprocess_mpt(prompt, tokenizer, has_image, sep="<|im_end|>", assistant="<|im_start|>assistant\n", pad_id=0):
    """Masks of preprocess_mpt (chatml_direct): the system, first question and
    answer are one round, each later question and answer another; rounds
    after the first count one more token with a legacy tokenizer; the total
    leaves out pad (<unk>) tokens."""
    encode = (lambda t: tokenizer_image_token(t, tokenizer)) if has_image else tokenizer
    ids = encode(prompt)
    target = list(ids)
    total = sum(1 for i in ids if i != pad_id)
    pieces = prompt.split(sep)
    rounds = [sep.join(pieces[:3])]
    k = 3
    while k < len(pieces):
        rounds.append(sep.join(pieces[k:k + 2]))
        k += 2
    cur = 0
    for i, rou in enumerate(rounds):
        if rou == "":
            break
        parts = rou.split(sep + assistant)
        if len(parts) != 2:
            break
        round_len = len(encode(rou))
        instruction_len = len(encode(parts[0] + sep + assistant)) - 1
        if i != 0 and tokenizer.legacy:
            round_len += 1
            instruction_len += 1
        target[cur:cur + instruction_len] = [IGNORE_INDEX] * len(target[cur:cur + instruction_len])
        cur += round_len
    target[cur:] = [IGNORE_INDEX] * len(target[cur:])
    if cur != total:
        target = [IGNORE_INDEX] * len(ids)
    return ids, target


def preprocess_plain(caption, tokenizer):
    ids = tokenizer_image_token("<image>" + caption + "\n", tokenizer)
    masked = len(tokenizer_image_token("<image>", tokenizer))
    return ids, [IGNORE_INDEX] * masked + ids[masked:]


# ---------------------------------------------------------------- LLaVA-1.6 (AnyRes)
#
# llava/mm_utils.py (`select_best_resolution`, `resize_and_pad_image`,
# `divide_to_patches`, `process_anyres_image`, `get_anyres_image_grid_shape`)
# and llava/model/llava_arch.py (`unpad_image`, the spatial merges of
# `prepare_inputs_labels_for_multimodal`), restated. Sizes and pinpoints are
# (width, height), as the original has them.


def anyres_fit(size, pinpoints):
    """The pinpoint an image of `size` goes on: most of its pixels kept (never
    counting more than it has), then least area wasted; the earliest of equals."""
    W, H = size
    ranked = []
    for order, (w, h) in enumerate(pinpoints):
        s = min(w / W, h / H)
        kept = min(int(W * s) * int(H * s), W * H)
        ranked.append((-kept, w * h - kept, order, (w, h)))
    return min(ranked)[3]


def anyres_canvas(image, target):
    """The image scaled (aspect kept, the filled side exact, the other rounded
    up) with PIL's default filter and pasted centred on a black canvas. The
    float steps are the original's: the scale first, then the product (750 *
    (672 / 1000) rounds up to 505 where 750 * 672 / 1000 gives 504)."""
    from PIL import Image

    W, H = image.size
    w, h = target
    sx, sy = w / W, h / H
    if sx < sy:
        size = (w, min(math.ceil(H * sx), h))
    else:
        size = (min(math.ceil(W * sy), w), h)
    canvas = Image.new("RGB", (w, h), (0, 0, 0))
    canvas.paste(image.resize(size), ((w - size[0]) // 2, (h - size[1]) // 2))
    return canvas


def anyres_crops(image, pinpoints, crop):
    """The whole image squashed to crop x crop, then the canvas's crop x crop
    tiles, left to right, top to bottom."""
    canvas = anyres_canvas(image, anyres_fit(image.size, pinpoints))
    w, h = canvas.size
    tiles = [canvas.crop((left, top, left + crop, top + crop)) for top in range(0, h, crop) for left in range(0, w, crop)]
    return [image.resize((crop, crop))] + tiles


def anyres_unpad(features, size):
    """(C, rows, cols) feature map of the padded canvas -> the part showing
    the image; the kept side's length is truncated (int), the bars split evenly."""
    W, H = size
    rows, cols = features.shape[1:]
    if W / H > cols / rows:
        keep = int(H * (cols / W))
        cut = (rows - keep) // 2
        return features[:, cut:rows - cut, :]
    keep = int(W * (rows / H))
    cut = (cols - keep) // 2
    return features[:, :, cut:cols - cut]


def anyres_merge(crop_features, size, pinpoints, crop, side, newline=None, merge="spatial_unpad"):
    """One image's projected crop features (crops, side*side, D), torch ->
    its visual tokens (n, D): base image first, then the grid as one map,
    unpadded and with `newline` after each row (spatial_unpad), or as it is
    (spatial); flat: every crop's tokens in turn."""
    import torch

    if merge == "flat":
        return crop_features.reshape(-1, crop_features.shape[-1])
    w, h = anyres_fit(size, pinpoints)
    cols, rows = w // crop, h // crop
    grid = crop_features[1:].reshape(rows, cols, side, side, -1)
    D = grid.shape[-1]
    if merge == "spatial":
        tokens = grid.permute(0, 2, 1, 3, 4).reshape(-1, D)
    else:
        fmap = grid.permute(4, 0, 2, 1, 3).reshape(D, rows * side, cols * side)
        fmap = anyres_unpad(fmap, size)
        ends = newline.reshape(D, 1, 1).expand(D, fmap.shape[1], 1)
        tokens = torch.cat([fmap, ends], dim=2).reshape(D, -1).T
    return torch.cat([crop_features[0], tokens])
