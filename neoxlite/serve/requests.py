"""OpenAI request bodies -> checked settings; every mistake an ApiError with OpenAI's error shape and status."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from neoxlite.generation import GREEDY_BELOW_TEMPERATURE, SEED_RANGE, SamplingSettings
from neoxlite.limits import lone_surrogate

# A stop string longer than this is refused: each is looked for at every token, on the server's event loop.
MAX_STOP_CHARS = 1000


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


_MISSING = object()


def _get(body: dict[str, Any], name: str, types: type | tuple[type, ...], default: Any = None,
         what: str = "") -> Any:
    """body[name] checked against `types` (None and a missing key give `default`); a bool is no number."""
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    numbers = types in (int, float, (int, float))
    if not isinstance(value, types) or (numbers and isinstance(value, bool)):
        raise ApiError(400, f"'{name}' must be {what or _type_words(types)}, got {json_type(value)}", name)
    return value


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float, closed_low: bool = True,
            note: str = "") -> float:
    """body[name] as a float within [low, high] ((low, high] with closed_low=False)."""
    value = _get(body, name, (int, float), default)
    bounds = f"{'[' if closed_low else '('}{low:g}, {high:g}]{note}"
    try:
        number = float(value)
    except OverflowError:  # an integer with hundreds of digits
        raise ApiError(400, f"{name} must be within {bounds}, got an integer of {len(str(abs(value)))} digits",
                       name) from None
    if not (low <= number if closed_low else low < number) or not number <= high:
        raise ApiError(400, f"{name} must be within {bounds}, got {number:g}", name)
    return number


def _text(text: str, what: str, param: str) -> str:
    """`text` when it is valid Unicode: JSON's \\ud800 escapes can make lone surrogates, which no tokenizer reads."""
    at = lone_surrogate(text)
    if at is not None:
        raise ApiError(400, f"{what} is not valid Unicode: a lone surrogate ({text[at]!r}) at character "
                            f"{at}; send well-formed UTF-8 text", param, "invalid_unicode")
    return text


def _type_words(types: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array",
             dict: "an object"}
    return " or ".join(names[t] for t in (types if isinstance(types, tuple) else (types,)))


def json_type(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


@dataclass
class Generation:
    """What both endpoints ask of the batcher."""

    model: str
    max_tokens: int | None  # None: up to the end of the context (chat's default)
    sampling: SamplingSettings
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    presence_penalty: float
    frequency_penalty: float
    logprobs: int | None
    logit_bias: dict[int, float]
    prompt: Any = None  # completions: a string or token ids
    messages: list[dict[str, str]] = field(default_factory=list)  # chat


def parse(body: Any, chat: bool) -> Generation:
    """Checks a /v1/completions (chat=False) or /v1/chat/completions body."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {json_type(body)}")
    model = _get(body, "model", str)
    if model is None:
        raise ApiError(400, "'model' is required: pass the id GET /v1/models lists", "model")
    n = _get(body, "n", int, 1)
    if n != 1:
        raise ApiError(400, f"n={n}: this server returns one choice per request; send n=1 (or several requests)", "n")
    if _get(body, "best_of", int, 1) != 1:
        raise ApiError(400, "best_of must be 1: this server returns the one sequence it samples", "best_of")
    if not chat and _get(body, "echo", bool, False):
        raise ApiError(400, "echo is not supported: the response carries the completion only", "echo")
    max_tokens = _get(body, "max_completion_tokens", int) if chat else None
    max_tokens = _get(body, "max_tokens", int, max_tokens if chat else 16)
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    temperature = _number(body, "temperature", 1.0, 0, 2,
                          note=f" (0, or below {GREEDY_BELOW_TEMPERATURE:g}: greedy)")
    top_p = _number(body, "top_p", 1.0, 0, 1, closed_low=False)
    penalties = {name: _number(body, name, 0.0, -2, 2) for name in ("presence_penalty", "frequency_penalty")}
    stop = _get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a non-empty string or a list of up to 4 of them", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise ApiError(400, f"a stop string may be at most {MAX_STOP_CHARS} characters long, got one of "
                            f"{max(len(s) for s in stop)}", "stop")
    stop = [_text(s, "a stop string", "stop") for s in stop]
    seed = _get(body, "seed", int)
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ApiError(400, f"seed must be an integer within [-2**63, 2**64 - 1], got {seed}", "seed")
    stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict, {})
    include_usage = _get(options, "include_usage", bool, False, "a boolean (stream_options.include_usage)")
    logprobs = _logprobs(body, chat)
    # temperature 0 is greedy; OpenAI's sampling has no top-k
    sampling = (SamplingSettings(do_sample=True, temperature=temperature, top_k=None, top_p=top_p)
                if temperature > 0 else SamplingSettings())
    generation = Generation(model, max_tokens, sampling, seed, stop, stream, include_usage,
                            penalties["presence_penalty"], penalties["frequency_penalty"], logprobs,
                            _logit_bias(body))
    if chat:
        generation.messages = _messages(body)
    else:
        generation.prompt = _prompt(body)
    return generation


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    if chat:
        if _get(body, "logprobs", bool, False) or body.get("top_logprobs") is not None:
            raise ApiError(400, "logprobs are served by /v1/completions only; leave them off for chat", "logprobs")
        return None
    logprobs = _get(body, "logprobs", int)
    if logprobs is not None and not 0 <= logprobs <= 5:
        raise ApiError(400, f"logprobs must be within [0, 5], got {logprobs}", "logprobs")
    return logprobs


def _logit_bias(body: dict[str, Any]) -> dict[int, float]:
    """OpenAI's logit_bias: {"token id": bias within [-100, 100]}; the ids are checked against the vocabulary later."""
    bias = _get(body, "logit_bias", dict, {})
    out = {}
    for key in bias:
        token = key if isinstance(key, str) else str(key) if type(key) is int else ""  # JSON's keys are strings
        if not (token.isascii() and token.isdigit() and len(token) <= 12):
            raise ApiError(400, f"logit_bias keys must be token ids (non-negative integers as strings), got {key!r}",
                           "logit_bias")
        value = bias[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise ApiError(400, f"logit_bias[{key!r}] must be a number within [-100, 100], got {value!r:.40}",
                           "logit_bias")
        out[int(token)] = float(value)
    return out


def _prompt(body: dict[str, Any]) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str) and prompt:
        return _text(prompt, "the prompt", "prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise ApiError(400, "'prompt' must be a non-empty string or array of token ids (one prompt per request)",
                   "prompt")


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array of {role, content} objects", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object, got {json_type(message)}", "messages")
        role, content = message.get("role"), message.get("content")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role must be system, user or assistant, got {role!r}", "messages")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string, got {json_type(content)}", "messages")
        out.append({"role": role, "content": _text(content, f"messages[{i}].content", "messages")})
    return out
