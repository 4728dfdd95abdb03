"""The head ⇄ engine wire protocol: one JSON object per ZeroMQ frame, typed at both ends.

The engine is the head's child process (an ipc:// DEALER connecting to the head's
ROUTER), so this is not a network boundary, but the engine can die half-way through a
write and the head must never trust a message blindly: every frame is parsed once,
here, into one of the dataclasses below, and anything else raises `BadMessage`, which
the receiver logs and drops.

Why it lives in `common`: the head (appliance.head.engine_process) and the engine
process (appliance.engine) both speak it, and neither may import the other.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, NamedTuple, Union


class BadMessage(ValueError):
    """A frame that is not a valid engine-protocol message."""


# ------------------------------------------------------------------ fields
def _int(d: dict[str, Any], key: str, *, default: int | None = None, lo: int | None = None) -> int:
    v = d.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool):
        raise BadMessage(f"{key!r} must be an integer")
    if lo is not None and v < lo:
        raise BadMessage(f"{key!r} must be >= {lo}")
    return v


def _float(d: dict[str, Any], key: str, *, default: float | None = None) -> float:
    v = d.get(key, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise BadMessage(f"{key!r} must be a finite number")
    return float(v)


def _bool(d: dict[str, Any], key: str, *, default: bool) -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise BadMessage(f"{key!r} must be true or false")
    return v


def _str(d: dict[str, Any], key: str, *, default: str | None = None, limit: int = 4096) -> str:
    v = d.get(key, default)
    if not isinstance(v, str):
        raise BadMessage(f"{key!r} must be a string")
    return v[:limit]


def _tokens(d: dict[str, Any], key: str) -> tuple[int, ...]:
    v = d.get(key, [])
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v):
        raise BadMessage(f"{key!r} must be a list of token ids")
    return tuple(v)


# ---------------------------------------------------------------- messages
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024
MAX_GRAMMAR_CHARS = 1 << 20


def _bounded(d: dict[str, Any], key: str, *, default: float, lo: float, hi: float) -> float:
    v = _float(d, key, default=default)
    if not lo <= v <= hi:
        raise BadMessage(f"{key!r} must be in [{lo}, {hi}]")
    return v


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How the engine picks each next token of one request (its sampler chain).

    Neutral values switch a stage off: top_k 0, top_p 1, min_p 0, penalties 0 (repeat 1),
    no logit_bias, no grammar. Penalties count the tokens the request has generated.
    """

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    seed: int | None = None  # None: a random seed per request
    grammar: str = ""  # GBNF the output must match ("" : none); root rule "root"
    logprobs: int | None = None  # None: none; k: the sampled token's logprob and the k most likely

    @classmethod
    def parse(cls, d: Any) -> "Sampling":
        if not isinstance(d, dict):
            raise BadMessage("'sampling' must be an object")
        seed = d.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32):
            raise BadMessage("'seed' must be an unsigned 32-bit integer or null")
        bias = d.get("logit_bias", [])
        if not isinstance(bias, list) or len(bias) > MAX_LOGIT_BIAS:
            raise BadMessage(f"'logit_bias' must be a list of at most {MAX_LOGIT_BIAS} [token, bias] pairs")
        pairs = []
        for it in bias:
            if (
                not isinstance(it, list) or len(it) != 2
                or not isinstance(it[0], int) or isinstance(it[0], bool) or it[0] < 0
                or not isinstance(it[1], (int, float)) or isinstance(it[1], bool)
                or not math.isfinite(it[1]) or not -100 <= it[1] <= 100
            ):
                raise BadMessage("'logit_bias' must hold [token id, bias in [-100, 100]] pairs")
            pairs.append((it[0], float(it[1])))
        grammar = _str(d, "grammar", default="", limit=MAX_GRAMMAR_CHARS + 1)
        if len(grammar) > MAX_GRAMMAR_CHARS:
            raise BadMessage(f"'grammar' is longer than {MAX_GRAMMAR_CHARS} characters")
        logprobs = d.get("logprobs")
        if logprobs is not None:
            logprobs = _int(d, "logprobs", lo=0)
            if logprobs > MAX_TOP_LOGPROBS:
                raise BadMessage(f"'logprobs' must be at most {MAX_TOP_LOGPROBS}")
        return cls(
            temperature=_bounded(d, "temperature", default=0.0, lo=0.0, hi=100.0),
            top_p=_bounded(d, "top_p", default=1.0, lo=0.0, hi=1.0),
            top_k=_int(d, "top_k", default=0, lo=0),
            min_p=_bounded(d, "min_p", default=0.0, lo=0.0, hi=1.0),
            presence_penalty=_bounded(d, "presence_penalty", default=0.0, lo=-2.0, hi=2.0),
            frequency_penalty=_bounded(d, "frequency_penalty", default=0.0, lo=-2.0, hi=2.0),
            repeat_penalty=_bounded(d, "repeat_penalty", default=1.0, lo=0.01, hi=10.0),
            logit_bias=tuple(pairs),
            seed=seed,
            grammar=grammar,
            logprobs=logprobs,
        )


@dataclass(frozen=True, kw_only=True)
class Submit:
    """head → engine: decode `tokens`, then sample up to `max_new` tokens.

    `replay` are the tokens a previous engine already sent to the client for this request
    (after an engine restart): the engine brings them into the KV cache, accepts them into
    the request's sampler chain (so penalties, grammar and the seeded random generator
    are where they were) and continues.

    `speculative`: the engine may check drafted tokens for this request (speculative
    decoding; the text is the same either way, only the speed differs).
    """

    T: ClassVar[str] = "submit"
    id: str
    tokens: tuple[int, ...]
    max_new: int
    sampling: Sampling = field(default_factory=Sampling)
    replay: tuple[int, ...] = ()
    speculative: bool = True

    @classmethod
    def parse(cls, d: dict[str, Any]) -> "Submit":
        return cls(
            id=_str(d, "id", limit=64),
            tokens=_tokens(d, "tokens"),
            max_new=_int(d, "max_new", lo=1),
            sampling=Sampling.parse(d.get("sampling", {})),
            replay=_tokens(d, "replay"),
            speculative=_bool(d, "speculative", default=True),
        )


@dataclass(frozen=True, kw_only=True)
class Cancel:
    """head → engine: the client went away; free the request's sequence."""

    T: ClassVar[str] = "cancel"
    id: str

    @classmethod
    def parse(cls, d: dict[str, Any]) -> "Cancel":
        return cls(id=_str(d, "id", limit=64))


@dataclass(frozen=True, kw_only=True)
class Stop:
    """head → engine: exit now (the head restarts or re-plans)."""

    T: ClassVar[str] = "stop"

    @classmethod
    def parse(cls, d: dict[str, Any]) -> "Stop":
        return cls()


@dataclass(frozen=True, kw_only=True)
class Hello:
    """engine → head: the process runs (its pid)."""

    T: ClassVar[str] = "hello"
    pid: int

    @classmethod
    def parse(cls, d: dict[str, Any]) -> "Hello":
        return cls(pid=_int(d, "pid", lo=0))


@dataclass(frozen=True, kw_only=True)
class Progress:
    """engine → head: model load progress, 0..1 (tensors sent to the workers)."""

    T: ClassVar[str] = "progress"
    fraction: float

    @classmethod
    def parse(cls, d: dict[str, Any]) -> "Progress":
        return cls(fraction=min(max(_float(d, "fraction"), 0.0), 1.0))


@dataclass(frozen=True, kw_only=True)
class Ready:
    """engine → head: loaded, serving."""

    T: ClassVar[str] = "ready"
    n_ctx_seq: int
    max_batch: int
    load_s: float

    @classmethod
    def parse(cls, d: dict[str, Any]) -> "Ready":
        return cls(n_ctx_seq=_int(d, "n_ctx_seq", lo=1), max_batch=_int(d, "max_batch", lo=1), load_s=_float(d, "load_s"))


@dataclass(frozen=True, kw_only=True)
class Failed:
    """engine → head: the load failed (the process exits next)."""

    T: ClassVar[str] = "failed"
    error: str

    @classmethod
    def parse(cls, d: dict[str, Any]) -> "Failed":
        return cls(error=_str(d, "error", default="load failed", limit=1000))


@dataclass(frozen=True)
class Logprob:
    """The log-probability of a sampled token under the model (before any sampling stage),
    and the `top` most likely tokens at that position, most likely first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class Sampled(NamedTuple):
    """One sampled token of one request; `logprob` only when the request asked for it."""

    rid: str
    token: int
    logprob: Logprob | None = None


def _logprob(v: Any) -> Logprob:
    def num(x: Any) -> float:
        if not isinstance(x, (int, float)) or isinstance(x, bool) or math.isnan(x) or x > 0:
            raise BadMessage("a logprob must be a number <= 0")
        return float(x)

    if not isinstance(v, list) or len(v) != 2 or not isinstance(v[1], list) or len(v[1]) > MAX_TOP_LOGPROBS:
        raise BadMessage("a token's logprob must be [logprob, [[token, logprob], ...]]")
    top = []
    for it in v[1]:
        if not isinstance(it, list) or len(it) != 2 or not isinstance(it[0], int) or isinstance(it[0], bool) or it[0] < 0:
            raise BadMessage("top logprobs must be [token, logprob] pairs")
        top.append((it[0], num(it[1])))
    return Logprob(logprob=num(v[0]), top=tuple(top))


@dataclass(frozen=True, kw_only=True)
class Tokens:
    """engine → head: one decode step's sampled tokens, for every active sequence.

    On the wire each item is `[request id, token]`, or `[request id, token, [logprob,
    [[token, logprob], ...]]]` for a request that asked for logprobs.
    """

    T: ClassVar[str] = "tokens"
    items: tuple[Sampled, ...]

    def wire(self) -> dict[str, Any]:
        out: list[list[Any]] = []
        for it in self.items:
            if it.logprob is None:
                out.append([it.rid, it.token])
            else:
                out.append([it.rid, it.token, [it.logprob.logprob, [list(p) for p in it.logprob.top]]])
        return {"items": out}

    @classmethod
    def parse(cls, d: dict[str, Any]) -> "Tokens":
        items = d.get("items")
        if not isinstance(items, list):
            raise BadMessage("'items' must be a list")
        out = []
        for it in items:
            if (
                not isinstance(it, list)
                or len(it) not in (2, 3)
                or not isinstance(it[0], str)
                or not isinstance(it[1], int)
                or isinstance(it[1], bool)
                or it[1] < 0
            ):
                raise BadMessage("'items' must hold [request id, token(, logprob)] lists")
            out.append(Sampled(it[0], it[1], _logprob(it[2]) if len(it) == 3 else None))
        return cls(items=tuple(out))


@dataclass(frozen=True, kw_only=True)
class Done:
    """engine → head: a request finished: "stop" (end of generation), "length", "context".

    `drafted` / `accepted`: drafted tokens this engine checked for the request, and how many
    of them were right (speculative decoding)."""

    T: ClassVar[str] = "done"
    id: str
    reason: str = "stop"
    produced: int = 0
    drafted: int = 0
    accepted: int = 0

    @classmethod
    def parse(cls, d: dict[str, Any]) -> "Done":
        return cls(id=_str(d, "id", limit=64), reason=_str(d, "reason", default="stop", limit=32),
                   produced=_int(d, "produced", default=0, lo=0), drafted=_int(d, "drafted", default=0, lo=0),
                   accepted=_int(d, "accepted", default=0, lo=0))


@dataclass(frozen=True, kw_only=True)
class Error:
    """engine → head: the engine rejected a request (it does not fit the context, ...)."""

    T: ClassVar[str] = "error"
    id: str
    error: str

    @classmethod
    def parse(cls, d: dict[str, Any]) -> "Error":
        return cls(id=_str(d, "id", limit=64), error=_str(d, "error", default="engine error", limit=1000))


@dataclass(frozen=True, kw_only=True)
class Heartbeat:
    """engine → head, every ENGINE_HEARTBEAT_INTERVAL_S: progress counters (stall detection)."""

    T: ClassVar[str] = "hb"
    active: int
    queued: int
    steps: int  # decode steps
    tokens: int  # tokens sampled and sent
    prefilled: int = 0  # tokens brought in by prefills (prompts and resumed answers)
    decodes: int = 0  # llama_decode calls (prefill chunks and decode steps)
    drafted: int = 0  # drafted tokens checked (speculative decoding)
    accepted: int = 0  # of those, the ones that were right

    @classmethod
    def parse(cls, d: dict[str, Any]) -> "Heartbeat":
        keys = ("active", "queued", "steps", "tokens", "prefilled", "decodes", "drafted", "accepted")
        return cls(**{k: _int(d, k, default=0, lo=0) for k in keys})


ToEngine = Union[Submit, Cancel, Stop]
FromEngine = Union[Hello, Progress, Ready, Failed, Tokens, Done, Error, Heartbeat]
Message = Union[ToEngine, FromEngine]

TO_ENGINE: dict[str, type] = {c.T: c for c in (Submit, Cancel, Stop)}
FROM_ENGINE: dict[str, type] = {c.T: c for c in (Hello, Progress, Ready, Failed, Tokens, Done, Error, Heartbeat)}


def encode(msg: Message) -> bytes:
    body = msg.wire() if isinstance(msg, Tokens) else asdict(msg)
    body["t"] = msg.T
    return json.dumps(body, separators=(",", ":")).encode()


def decode(raw: bytes, *, allowed: dict[str, type]) -> Any:
    """Parse one frame into one of `allowed`'s message types; `BadMessage` otherwise."""
    try:
        d = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BadMessage(f"not JSON: {str(exc)[:80]}") from None
    if not isinstance(d, dict):
        raise BadMessage("not a JSON object")
    cls = allowed.get(d.get("t"))  # type: ignore[arg-type]
    if cls is None:
        raise BadMessage(f"unknown message type {str(d.get('t'))[:32]!r}")
    return cls.parse(d)  # type: ignore[attr-defined]
