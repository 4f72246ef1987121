"""TextVQA, VQAv2 and GQA: the standard answer normalisation and accuracy.

TextVQA, as the original's `eval_textvqa.py` (m4c's evaluator): prediction
and the ten human answers all normalised (`normalize_answer`, EvalAI's
answer processor); a prediction scores, for its normalised string, the
mean over the ten leave-one-out subsets of min(1, matches among the other
nine / 3); answers are matched to annotations by (image id, question),
the question read back from the recorded prompt as the original does.

VQAv2 (a local val split; the paper's figure is the test-dev server's):
the prediction normalised as LLaVA's submission script does
(`normalize_answer`), then scored as the VQA evaluation server does:
prediction punctuation- and digit/article-processed, the human answers
punctuation-processed only when they disagree, then the same leave-one-out
soft accuracy; overall and per answer type.

GQA, as LLaVA's `convert_gqa_for_eval.py` and GQA's `eval.py`: the
prediction with trailing periods removed and lower-cased must equal the
answer; accuracy overall, on binary and open questions, and per structural
and semantic type (GQA's consistency, validity, plausibility and
distribution figures need files beyond the questions and are left out).
"""

import json
import re
from collections import defaultdict
from pathlib import Path

from ..errors import LlavaError

# ------------------------------------------------------------ normalisation (EvalAI / m4c)

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# A period not followed by a digit. (The evaluators' pattern opens with "(?!<=\d)", a
# lookahead that never fires, so it only looks forward.) They pass re.UNICODE where
# re.sub takes its count, so at most 32 periods go.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIODS_REMOVED = 32
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d),+(?=\d)")


def process_punctuation(text: str) -> str:
    """EvalAI's punctuation rule: a mark touching a space (anywhere in the text),
    or any mark when a comma sits between digits, is deleted; otherwise it
    becomes a space. Then periods not followed by a digit are deleted."""
    out = text
    digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIODS_REMOVED)


def process_digit_article(text: str) -> str:
    """Lower case; number words to digits; articles dropped; contractions restored."""
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """EvalAI's answer processor (m4c's EvalAIAnswerProcessor), as the original uses it."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def soft_accuracy(prediction: str, answers: list) -> float:
    """Mean over the leave-one-out subsets of `answers` of min(1, matches / 3)."""
    scores = []
    for i in range(len(answers)):
        others = answers[:i] + answers[i + 1:]
        scores.append(min(1.0, sum(a == prediction for a in others) / 3))
    return sum(scores) / len(scores)


# ------------------------------------------------------------ TextVQA


def textvqa_question(prompt: str) -> str:
    """The question inside a recorded prompt, as the original's `prompt_processor` finds it."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if match is None:
            raise LlavaError(f"TextVQA: no 'Question: ... Short answer:' in prompt {prompt!r}")
        question = match.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise LlavaError(f"TextVQA: cannot find the question in prompt {prompt!r}")
    return question.lower()


def read_textvqa(path) -> list:
    """TextVQA's annotation file (`TextVQA_0.5.1_val.json`): its `data` list."""
    data = _load(path)
    if not isinstance(data, dict) or "data" not in data:
        raise LlavaError(f"{path}: expected TextVQA's annotations ({{'data': [...]}})")
    return data["data"]


def score_textvqa(answers: list, annotations: list) -> dict:
    by_key = {(str(a["image_id"]), a["question"].lower()): a for a in annotations}
    by_question_id = {str(a["question_id"]): a for a in annotations if "question_id" in a}
    scores = []
    for a in answers:
        key = (str(a["question_id"]), textvqa_question(a["prompt"]))
        annotation = by_key.get(key) or by_question_id.get(str(a["question_id"]))
        if annotation is None:
            raise LlavaError(f"TextVQA: no annotation for question {a['question_id']!r} ({key[1]!r})")
        truth = [normalize_answer(t) for t in annotation["answers"]]
        scores.append(soft_accuracy(normalize_answer(a["text"]), truth))
    accuracy = 100 * sum(scores) / len(scores) if scores else None
    return {"benchmark": "textvqa", "count": len(scores), "questions": len(annotations), "accuracy": accuracy,
            "main": accuracy}


def render_textvqa(result: dict) -> str:
    acc = "n/a" if result["accuracy"] is None else f"{result['accuracy']:.2f}%"
    return f"Samples: {result['count']}\nAccuracy: {acc}"


# ------------------------------------------------------------ VQAv2 (the evaluation server's rules)

_SERVER_MARKS = r"\\;/\"`\[\](){}<>@=+_\-,?!"
_SERVER_MARK_NEAR = re.compile(rf"(?<=[ {_SERVER_MARKS}])([{_SERVER_MARKS}])|([{_SERVER_MARKS}])(?=[ {_SERVER_MARKS}])")
_SERVER_MARK_IN_WORD = re.compile(rf"(?<=[a-zA-Z])([{_SERVER_MARKS}])(?=[a-zA-Z])")
_SPACES = re.compile(r"( +)")


def server_punctuation(text: str) -> str:
    """The VQA server's punctuation rule: commas between digits deleted; a mark
    next to a space or another mark, and a mark between letters, become
    spaces (runs of spaces collapsed between the two); then periods as above."""
    text = _DIGIT_COMMA_DIGIT.sub("", text)
    text = _SERVER_MARK_NEAR.sub(" ", text)
    text = _SPACES.sub(" ", text)
    text = _SERVER_MARK_IN_WORD.sub(" ", text)
    return _PERIOD.sub("", text, count=_PERIODS_REMOVED)


def read_vqav2(path) -> dict:
    """{question id: annotation} from VQAv2's annotation file (`v2_mscoco_val2014_annotations.json`)."""
    data = _load(path)
    if not isinstance(data, dict) or "annotations" not in data:
        raise LlavaError(f"{path}: expected VQAv2's annotations ({{'annotations': [...]}})")
    return {str(a["question_id"]): a for a in data["annotations"]}


def score_vqav2(answers: list, annotations: dict) -> dict:
    scores, by_type = [], defaultdict(list)
    for a in answers:
        annotation = annotations.get(str(a["question_id"]))
        if annotation is None:
            raise LlavaError(f"VQAv2: no annotation for question {a['question_id']!r}")
        prediction = normalize_answer(a["text"])  # LLaVA's submission step
        prediction = prediction.replace("\n", " ").replace("\t", " ").strip()
        prediction = process_digit_article(server_punctuation(prediction))
        truth = [t["answer"] for t in annotation["answers"]]
        if len(set(truth)) > 1:
            truth = [server_punctuation(t) for t in truth]
        score = soft_accuracy(prediction, truth)
        scores.append(score)
        by_type[annotation.get("answer_type", "all")].append(score)
    accuracy = 100 * sum(scores) / len(scores) if scores else None
    return {"benchmark": "vqav2", "count": len(scores), "questions": len(annotations), "accuracy": accuracy,
            "per_answer_type": {k: 100 * sum(v) / len(v) for k, v in sorted(by_type.items())}, "main": accuracy}


def render_vqav2(result: dict) -> str:
    if result["accuracy"] is None:
        return "no answers"
    lines = [f"Overall Accuracy is: {result['accuracy']:.2f}", "Per Answer Type Accuracy is the following:"]
    lines += [f"{k} : {v:.2f}" for k, v in result["per_answer_type"].items()]
    return "\n".join(lines + [f"({result['count']} of {result['questions']} questions answered)"])


# ------------------------------------------------------------ GQA


def read_gqa(path) -> dict:
    """{question id: question} from GQA's questions file (`testdev_balanced_questions.json`)."""
    data = _load(path)
    if not isinstance(data, dict) or not all(isinstance(q, dict) and "answer" in q for q in data.values()):
        raise LlavaError(f"{path}: expected GQA's questions ({{id: {{question, answer, types, ...}}}})")
    return data


def score_gqa(answers: list, questions: dict) -> dict:
    scores = defaultdict(list)
    for a in answers:
        q = questions.get(str(a["question_id"]))
        if q is None:
            raise LlavaError(f"GQA: question {a['question_id']!r} is not in the questions file")
        if not q.get("isBalanced", True):
            continue
        right = float(a["text"].rstrip(".").lower() == q["answer"])
        types = q.get("types", {})
        scores["accuracy"].append(right)
        scores["open" if types.get("structural") == "query" else "binary"].append(right)
        scores[f"structural/{types.get('structural')}"].append(right)
        scores[f"semantic/{types.get('semantic')}"].append(right)
    figures = {k: 100 * sum(v) / len(v) for k, v in scores.items()}
    return {"benchmark": "gqa", "count": len(scores["accuracy"]), "questions": len(questions),
            "accuracy": figures.get("accuracy"), "binary": figures.get("binary"), "open": figures.get("open"),
            "per_type": {k: (figures[k], len(scores[k])) for k in sorted(figures) if "/" in k},
            "main": figures.get("accuracy")}


def render_gqa(result: dict) -> str:
    if result["accuracy"] is None:
        return "no answers"
    lines = [f"Binary: {result['binary'] or 0:.2f}%", f"Open: {result['open'] or 0:.2f}%",
             f"Accuracy: {result['accuracy']:.2f}%", ""]
    lines += [f"{k}: {v:.2f}% ({n} questions)" for k, (v, n) in result["per_type"].items()]
    return "\n".join(lines + [f"({result['count']} of {result['questions']} questions answered)"])


def _load(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LlavaError(f"annotation file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise LlavaError(f"{path} is not valid JSON ({e})") from None
