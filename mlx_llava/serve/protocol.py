"""OpenAI's chat-completions request, read and checked; its answers and errors, written.

`parse_chat` turns a request body into what `mlx_llava.batch.Request` needs:
messages whose content is text with `<image>` where each image part stood
(text and image parts of a message joined by newlines, so an image then a
question renders exactly as `mlx-llava generate` renders it), the image URLs
in that order, and the sampling options. Anything it cannot honour is an
`APIError` with the status and the JSON OpenAI's API answers with.
"""

import time
import uuid
from dataclasses import dataclass, field
from typing import List, Optional

from ..conversation import IMAGE_PLACEHOLDER
from ..errors import is_int, is_number

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
               500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An answer with an error status, as OpenAI's API gives it:
    {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param, code)


# Fields a client may send that change nothing here (or only at their default values).
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prediction", "modalities"}
DEFAULT_ONLY = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logprobs": (False,),
                "top_logprobs": (0,), "logit_bias": ({},), "tools": ([],), "tool_choice": ("none",),
                "functions": ([],), "function_call": ("none",)}
KNOWN = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
         "top_p", "seed", "stop", "n", "repetition_penalty", "response_format"} | IGNORED | set(DEFAULT_ONLY)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 4


@dataclass
class ChatRequest:
    messages: List[dict]  # {"role", "content"} with <image> placeholders
    image_urls: List[str]  # in placeholder order
    model: Optional[str] = None
    stream: bool = False
    include_usage: bool = False
    max_tokens: Optional[int] = None  # None: until the answer ends or the context is full
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    repetition_penalty: Optional[float] = None
    stop: List[str] = field(default_factory=list)


def parse_chat(body) -> ChatRequest:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise bad(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    for name, defaults in DEFAULT_ONLY.items():
        value = body.get(name)
        if value is not None and value not in defaults:
            raise bad(f"{name} is not supported by this server (only {defaults[0]!r})", name)
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise bad("response_format: only {'type': 'text'} is supported", "response_format")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model must be a string", "model")
    n = body.get("n")
    if n is not None and n != 1:
        raise bad(f"n must be 1 (one answer per request), not {n!r}", "n")

    messages, urls = parse_messages(body.get("messages"))
    stream = option(body, "stream", bool, False)
    options = option(body, "stream_options", dict, None) or {}
    if set(options) - {"include_usage"} or not isinstance(options.get("include_usage", False), bool):
        raise bad("stream_options may only hold include_usage (true or false)", "stream_options")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if max_tokens is not None and not (is_int(max_tokens) and max_tokens >= 1):
        raise bad(f"{param} must be a positive integer, not {max_tokens!r}", param)
    temperature = option(body, "temperature", (int, float), 0.0)
    if not (is_number(temperature) and 0 <= temperature <= 2):
        raise bad(f"temperature must be from 0 to 2, not {temperature!r}", "temperature")
    top_p = option(body, "top_p", (int, float), 1.0)
    if not (is_number(top_p) and 0 < top_p <= 1):
        raise bad(f"top_p must be in (0, 1], not {top_p!r}", "top_p")
    seed = body.get("seed")
    if seed is not None and not (is_int(seed) and 0 <= seed < 2**64):
        raise bad(f"seed must be an integer from 0 to 2**64 - 1, not {seed!r}", "seed")
    penalty = body.get("repetition_penalty")
    if penalty is not None and not (is_number(penalty) and penalty > 0):
        raise bad(f"repetition_penalty must be more than 0, not {penalty!r}", "repetition_penalty")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and len(stop) <= MAX_STOPS and all(isinstance(s, str) and s for s in stop)):
        raise bad(f"stop must be a string or a list of up to {MAX_STOPS} non-empty strings", "stop")
    return ChatRequest(messages, urls, model, stream, options.get("include_usage", False), max_tokens,
                       float(temperature), float(top_p), seed, penalty, list(stop))


def option(body: dict, name: str, kinds, default):
    """body[name] if it is one of `kinds` (a bool only where bool is named), `default` if absent."""
    value = body.get(name)
    if value is None:
        return default
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise bad(f"{name} has the wrong type ({type(value).__name__})", name)
    return value


def parse_messages(messages) -> tuple:
    """OpenAI messages -> ([{"role", "content"}], image URLs). A system (or
    developer) message may lead; then user and assistant turns alternate
    (consecutive user messages are joined) and the last is the user's."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    out, urls = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object", where)
        role = ROLES.get(m.get("role"))
        if role is None:
            raise bad(f"{where}.role must be one of system, developer, user, assistant, not {m.get('role')!r}",
                      f"{where}.role")
        if m.get("tool_calls") or m.get("function_call"):
            raise bad(f"{where}: tool calls are not supported", where)
        text, images = content_text(m.get("content"), role, where)
        if role == "system":
            if out:
                raise bad(f"{where}: a system message may only come first", where)
        elif not text.strip() and not images:
            raise bad(f"{where}: the {role} message is empty", f"{where}.content")
        urls += images
        if out and out[-1]["role"] == role == "user":
            out[-1]["content"] += "\n" + text
        elif out and out[-1]["role"] == role:
            raise bad(f"{where}: two {role} messages in a row (user and assistant turns alternate)", where)
        else:
            out.append({"role": role, "content": text})
    if out[-1]["role"] != "user":
        raise bad("the last message must be the user's (the assistant answers it)", "messages")
    if len(out) > 1 and out[1]["role"] != "user" and out[0]["role"] == "system":
        raise bad("after the system message the conversation starts with the user", "messages")
    if out[0]["role"] == "assistant":
        raise bad("the conversation starts with the user (or a system message)", "messages")
    return out, urls


def content_text(content, role: str, where: str) -> tuple:
    """A message's content (a string or a list of parts) -> (text with <image>s, image URLs)."""
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = content
    else:
        raise bad(f"{where}.content must be a string or a list of parts", f"{where}.content")
    pieces, urls = [], []
    for j, part in enumerate(parts):
        here = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise bad(f"{here}.text must be a string", here)
            if IMAGE_PLACEHOLDER in text:
                raise bad(f"{here}: the text must not contain {IMAGE_PLACEHOLDER}; send images as image_url parts",
                          here)
            pieces.append(text)
        elif kind == "image_url":
            if role != "user":
                raise bad(f"{here}: only user messages may hold images", here)
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise bad(f"{here}.image_url.url must be a string", here)
            detail = image.get("detail") if isinstance(image, dict) else None
            if detail not in (None, "auto", "low", "high"):
                raise bad(f"{here}.image_url.detail must be auto, low or high, not {detail!r}", here)
            pieces.append(IMAGE_PLACEHOLDER)
            urls.append(url)
        else:
            raise bad(f"{here}.type must be text or image_url, not {kind!r}", here)
    return "\n".join(pieces), urls


# ---------------------------------------------------------------- answers


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(cid: str, model: str, created: int, delta: Optional[dict] = None, finish_reason=None,
          with_usage: bool = False) -> dict:
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}]}
    if with_usage:  # include_usage: every chunk has the field, null until the last one
        out["usage"] = None
    return out
