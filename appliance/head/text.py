"""Head-side text handling: tokenize, apply the model's chat template, detokenize, stop.

The API server never holds the weights (the engine does, in another process); it loads
the model's vocabulary only (`vocab_only=True`, a few MB) so that it can count prompt
tokens for the context check, keep each request as tokens (what makes resumption after
an engine restart exact), and turn sampled token ids back into text incrementally.
Chat formatting uses the GGUF's own Jinja template the same way llama-cpp-python's
`Llama.create_chat_completion` does, so the prompt tokens are identical.

Text is text: the template's own markers (`<|im_start|>` ...) are special tokens, but the
same strings inside a user's or a tool's message are tokenized as the plain characters they
are, so nobody can open a `system` turn from inside their question (`encode_chat`).
"""

from __future__ import annotations

import codecs
import ctypes
import re
from dataclasses import dataclass
from typing import Any, Sequence

GENERIC_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class TemplateError(ValueError):
    """The chat template rejected the messages (e.g. roles not alternating)."""


UNTRUSTED_ROLES = frozenset({"user", "tool"})  # whose text may carry strings of special tokens
_MARK = "\ue000{}\ue001"  # private-use characters: where a message's text goes in the prompt
_MARK_RE = re.compile("\ue000(\\d+)\ue001")


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    add_bos: bool
    stop: tuple[str, ...]


class ChatTemplate:
    """A Jinja chat template rendered exactly as llama-cpp-python's `create_chat_completion`
    renders it (its `Jinja2ChatFormatter`), with the request's `tools` passed to it."""

    def __init__(self, source: str, *, bos_token: str, eos_token: str, eos_id: int = -1) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.source = source
        self._formatter = Jinja2ChatFormatter(
            template=source, eos_token=eos_token, bos_token=bos_token, stop_token_ids=[eos_id]
        )

    def format_chat(self, messages: Sequence[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None) -> ChatPrompt:
        """The prompt for `messages`; `tools` become the template's `tools` variable (what
        llama.cpp's server and transformers pass)."""
        try:
            result = self._formatter(messages=list(messages), tools=tools or None)
        except Exception as exc:  # noqa: BLE001 - jinja raises many kinds
            raise TemplateError(f"the model's chat template rejected the messages: {exc}") from None
        stop = result.stop if isinstance(result.stop, list) else ([result.stop] if result.stop else [])
        return ChatPrompt(text=result.prompt, add_bos=not result.added_special, stop=tuple(s for s in stop if s))


class Tokenizer:
    def __init__(self, model_path: str) -> None:
        import llama_cpp
        from llama_cpp import _logger as llama_logger
        from llama_cpp._internals import LlamaModel

        llama_logger.set_verbose(False)
        self._ll = llama_cpp.llama_cpp
        params = self._ll.llama_model_default_params()
        params.vocab_only = True  # no weights, no context: a few MB
        self._model = LlamaModel(path_model=model_path, params=params, verbose=False)
        self._vocab = self._ll.llama_model_get_vocab(self._model.model)
        eos_id, bos_id = self._model.token_eos(), self._model.token_bos()
        self.eos_token = self._model.token_get_text(eos_id) if eos_id != -1 else ""
        self.bos_token = self._model.token_get_text(bos_id) if bos_id != -1 else ""
        template = self._model.metadata().get("tokenizer.chat_template")
        self.chat = ChatTemplate(template or GENERIC_TEMPLATE, bos_token=self.bos_token, eos_token=self.eos_token,
                                 eos_id=eos_id)
        self._buf = ctypes.create_string_buffer(256)
        self._special = self._special_pattern()

    def _special_pattern(self) -> re.Pattern[str] | None:
        """The strings llama.cpp parses as special tokens (control and user-defined tokens)."""
        import llama_cpp

        mask = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
        texts = {
            self._model.token_get_text(i)
            for i in range(self.vocab_size)
            if self._ll.llama_vocab_get_attr(self._vocab, i) & mask
        }
        texts = {s for s in texts if s}
        if not texts:
            return None
        return re.compile("|".join(re.escape(s) for s in sorted(texts, key=len, reverse=True)))

    def has_special(self, text: str) -> bool:
        return self._special is not None and self._special.search(text) is not None

    @property
    def vocab_size(self) -> int:
        return int(self._ll.llama_vocab_n_tokens(self._vocab))

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Tokens of `text`; BOS only if the model asks for it (llama.cpp's add_special)."""
        return list(self._model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def format_chat(self, messages: Sequence[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None) -> ChatPrompt:
        """The prompt for `messages` by the model's own template (ChatTemplate)."""
        return self.chat.format_chat(messages, tools=tools)

    def encode_chat(
        self, messages: Sequence[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None
    ) -> tuple[ChatPrompt, list[int]]:
        """The prompt for `messages` and its tokens, the text of user and tool messages taken
        literally: a special token's string in it is its characters, not the token.

        Without such strings (nearly always) the whole prompt is tokenized at once, exactly as
        llama-cpp-python does. With them, the template is rendered with a mark in place of
        each such message's text; the template's parts are tokenized with special tokens, the
        messages' text without.
        """
        prompt = self.format_chat(messages, tools=tools)
        literal = {
            i for i, m in enumerate(messages)
            if m.get("role") in UNTRUSTED_ROLES and isinstance(m.get("content"), str) and self.has_special(m["content"])
        }
        if not literal:
            return prompt, self.encode(prompt.text, add_bos=prompt.add_bos)
        marked = [dict(m, content=_MARK.format(i)) if i in literal else m for i, m in enumerate(messages)]
        skeleton = self.format_chat(marked, tools=tools).text
        found = [int(x) for x in _MARK_RE.findall(skeleton)]
        if sorted(found) != sorted(literal):
            raise TemplateError("a message contains a special token's text, and the model's chat template "
                                "transforms message text, so it cannot be kept literal; remove the token's text")
        tokens: list[int] = []
        pos, bos = 0, prompt.add_bos
        for m in _MARK_RE.finditer(skeleton):
            tokens += self._tokens(skeleton[pos : m.start()], special=True, add_bos=bos)
            tokens += self._tokens(messages[int(m.group(1))]["content"], special=False, add_bos=False)
            pos, bos = m.end(), False
        tokens += self._tokens(skeleton[pos:], special=True, add_bos=False)
        return prompt, tokens

    def _tokens(self, text: str, *, special: bool, add_bos: bool) -> list[int]:
        if not text and not add_bos:
            return []
        return list(self._model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))

    def check_grammar(self, grammar: str) -> bool:
        """Whether llama.cpp accepts `grammar` (GBNF, root rule `root`) for this vocabulary:
        the same parser the engine's grammar sampler uses, run here so that a bad grammar
        is a 400 and never reaches the engine."""
        smpl = self._ll.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
        if not smpl:
            return False
        self._ll.llama_sampler_free(smpl)
        return True

    def special_token(self, text: str) -> int | None:
        """The id of `text` when it is one special token of this vocabulary (a tool-call
        marker such as `<tool_call>` or `[TOOL_CALLS]`), else None."""
        ids = self._model.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        return int(ids[0]) if len(ids) == 1 and not self.piece(int(ids[0])) else None

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of `token`; special tokens (end of turn, ...) are empty unless `special`."""
        n = self._ll.llama_token_to_piece(self._vocab, token, self._buf, len(self._buf), 0, special)
        if n < 0:
            big = ctypes.create_string_buffer(-n)
            n = self._ll.llama_token_to_piece(self._vocab, token, big, len(big), 0, special)
            return big.raw[:n]
        return self._buf.raw[:n]


class Detokenizer:
    """Turns a stream of token ids into text deltas, never splitting a UTF-8 character.

    An incremental UTF-8 decoder holds back only an incomplete character at the end; an
    invalid byte (a byte-fallback token that is not UTF-8) becomes U+FFFD at once, and
    the text after it streams on as usual.
    """

    def __init__(self, tok: Tokenizer, *, keep: frozenset[int] = frozenset()) -> None:
        self.tok = tok
        self.keep = keep  # special tokens written out as text (a tool format's markers)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._decoder.decode(self.tok.piece(token, special=token in self.keep))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Finds stop strings in streamed text; holds back text that may start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self.hit = False

    def push(self, text: str) -> str:
        """Returns text safe to emit now; sets `hit` when a stop string appeared."""
        if not self.stops:
            return text
        buf = self.held + text
        first = min(((buf.find(s), s) for s in self.stops if s in buf), default=None)
        if first is not None:
            self.hit = True
            self.held = ""
            return buf[: first[0]]
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        self.held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out
