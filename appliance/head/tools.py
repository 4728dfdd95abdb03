"""Tool calling: tools rendered through the model's own chat template, calls parsed back out.

Models are trained to call tools in their own syntax; this module knows the common template
families, the same ones llama.cpp's server knows (common/chat.cpp):

| format    | the model writes                                              | templates                  |
|-----------|---------------------------------------------------------------|----------------------------|
| `hermes`  | `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` ×N | Hermes 2 Pro, Qwen 2.5 / 3 |
| `llama3`  | `{"name": ..., "parameters": {...}}`                          | Llama 3.1 / 3.2 / 3.3      |
| `mistral` | `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`        | Mistral Nemo / Small       |
| `generic` | `{"tool_call": {...}}`, `{"tool_calls": [...]}` or `{"response": "..."}` | any other template |

The format is chosen from the template's source (its markers) and what it does when
rendered: a template that ignores the `tools` it is given (SmolLM2's, for one) gets the
generic format, with the tools and the reply format described in the system message, the
way llama.cpp polyfills such templates. Earlier turns are rendered the way the template
expects them: native `tool_calls` and `role: tool` messages where it renders them, else as
the JSON the model itself would have written and as user messages carrying the result.

`tool_choice` `required` and a named function are enforced with a grammar (the function's
`parameters` schema compiled by `structured`), so the arguments always match the schema;
`auto` lets the model choose (the generic format is constrained to its three JSON shapes,
as in llama.cpp). `ToolParser` turns the generated text into content and calls while it
streams: a call's id and name go out as soon as the name is known, and its arguments as
they are generated, as OpenAI streams them.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

from appliance.head.structured import SchemaError, check_schema, schema_rules
from appliance.head.text import ChatTemplate, TemplateError


class ToolFormat(str, Enum):
    HERMES = "hermes"
    LLAMA3 = "llama3"
    MISTRAL = "mistral"
    GENERIC = "generic"


MARKERS = {
    ToolFormat.HERMES: ("<tool_call>", "</tool_call>"),
    ToolFormat.MISTRAL: ("[TOOL_CALLS]",),
    ToolFormat.LLAMA3: ("<|python_tag|>",),
    ToolFormat.GENERIC: (),
}


@dataclass(frozen=True, kw_only=True)
class TemplateCaps:
    """What a chat template does with tools, found by rendering it (like llama.cpp's minja)."""

    tools: bool  # renders the `tools` it is given
    tool_calls: bool  # renders an assistant message's `tool_calls`
    tool_responses: bool  # renders `role: tool` messages
    format: ToolFormat

    @classmethod
    def detect(cls, template: ChatTemplate) -> "TemplateCaps":
        source = template.source

        def shows(needle: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> bool:
            try:
                return needle in template.format_chat(messages, tools=tools).text
            except TemplateError:
                return False

        user = {"role": "user", "content": "Hey"}
        probe_tool = {"type": "function", "function": {
            "name": "anyway_probe_tool", "description": "probe",
            "parameters": {"type": "object", "properties": {"arg": {"type": "string"}}, "required": ["arg"]}}}
        call = {"role": "assistant", "content": "", "tool_calls": [
            {"id": "123456789", "type": "function",
             "function": {"name": "anyway_probe_call", "arguments": {"arg": "probe"}}}]}
        response = {"role": "tool", "tool_call_id": "123456789", "name": "anyway_probe_call",
                    "content": "anyway_probe_response"}
        tools = shows("anyway_probe_tool", [user], [probe_tool])
        # Templates check role order differently: try the shapes a conversation takes.
        tool_calls = any(shows("anyway_probe_call", msgs, [probe_tool])
                         for msgs in ([user, call], [user, call, response], [user, call, user]))
        responses = shows("anyway_probe_response", [user, call, response], [probe_tool]) or shows(
            "anyway_probe_response", [user, {"role": "tool", "content": "anyway_probe_response"}]
        )
        fmt = ToolFormat.GENERIC
        if tools:
            if "<tool_call>" in source:
                fmt = ToolFormat.HERMES
            elif "[TOOL_CALLS]" in source:
                fmt = ToolFormat.MISTRAL
            elif "<|start_header_id|>" in source and ("ipython" in source or '"parameters"' in source):
                fmt = ToolFormat.LLAMA3
        return cls(tools=tools, tool_calls=tool_calls, tool_responses=responses, format=fmt)


# ---------------------------------------------------------------- requests
@dataclass(frozen=True, kw_only=True)
class Function:
    name: str
    description: str | None
    parameters: dict[str, Any]

    def as_tool(self) -> dict[str, Any]:
        # Some templates read `description` unconditionally: it is always there.
        fn = {"name": self.name, "description": self.description or "", "parameters": self.parameters}
        return {"type": "function", "function": fn}


@dataclass(frozen=True, kw_only=True)
class ToolRequest:
    """The tool part of one chat request, validated."""

    functions: tuple[Function, ...]
    choice: str  # "none" | "auto" | "required" | "function"
    name: str | None = None  # the function, when choice == "function"
    parallel: bool = True


@dataclass(frozen=True, kw_only=True)
class ToolPlan:
    """How one request uses tools: what the template sees, the grammar, how to parse."""

    messages: list[dict[str, Any]]
    template_tools: list[dict[str, Any]] | None
    grammar: str
    format: ToolFormat
    parse: bool  # the output may hold calls: parse it
    max_calls: int | None
    named: bool
    preserve: tuple[str, ...] = ()  # special tokens to keep in the text (the format's markers)


def check_parameters(params: Any, *, param: str) -> None:
    """A function's `parameters`: a JSON object schema the grammar can enforce."""
    if not isinstance(params, dict):
        raise SchemaError(f"{param} must be a JSON schema object")
    check_schema(params)


def _call_schema(fn: Function, *, args_key: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": fn.name}, args_key: fn.parameters},
        "required": ["name", args_key],
    }


def _any(schemas: list[dict[str, Any]]) -> dict[str, Any]:
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def _grammar(req: ToolRequest, fmt: ToolFormat) -> str:
    """The grammar for the calls `req` forces (required / named), or the generic format's
    three shapes for `auto`; "" when the output is free (auto in a native format)."""
    fns = [f for f in req.functions if req.choice != "function" or f.name == req.name]
    forced = req.choice in ("required", "function")
    parallel = req.parallel and req.choice != "function"
    if fmt is ToolFormat.GENERIC:
        calls = _any([_call_schema(f, args_key="arguments") for f in fns])
        shape = (
            {"type": "object", "properties": {"tool_calls": {"type": "array", "items": calls, "minItems": 1}},
             "required": ["tool_calls"]}
            if parallel
            else {"type": "object", "properties": {"tool_call": calls}, "required": ["tool_call"]}
        )
        if not forced:
            reply = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"]}
            shape = {"anyOf": [shape, reply]}
        return schema_rules(shape, name="")[0]
    if not forced:
        return ""
    args_key = "parameters" if fmt is ToolFormat.LLAMA3 else "arguments"
    rules, call = schema_rules(_any([_call_schema(f, args_key=args_key) for f in fns]), name="call")
    if fmt is ToolFormat.HERMES:
        one = f'"<tool_call>\\n" {call} "\\n</tool_call>"'
        root = f'{one} ("\\n" {one})*' if parallel else one
    elif fmt is ToolFormat.MISTRAL:
        root = f'"[TOOL_CALLS]" "[" {call} ("," " "? {call})* "]"' if parallel else f'"[TOOL_CALLS]" "[" {call} "]"'
    else:
        root = call
    return f"{rules}\nroot ::= {root}\n"


GENERIC_AUTO = (
    "Respond in JSON format, either with `tool_call` (a request to call tools) or with `response` "
    "(your reply to the user's request)."
)
GENERIC_REQUIRED = "Respond in JSON format with `tool_call` (a request to call tools)."


def _generic_system(req: ToolRequest, *, describe_tools: bool) -> str:
    parts = []
    if describe_tools:
        tools = [f.as_tool() for f in req.functions if req.choice != "function" or f.name == req.name]
        parts.append("You can call any of the following tools to satisfy the user's requests: "
                     + json.dumps(tools, indent=2))
    key = "tool_calls" if req.parallel and req.choice != "function" else "tool_call"
    example_call = {"name": "tool_name", "arguments": {"arg1": "some_value"}}
    example = {key: [example_call] if key == "tool_calls" else example_call}
    forced = req.choice in ("required", "function")
    parts.append(GENERIC_REQUIRED.replace("tool_call", key) if forced else GENERIC_AUTO.replace("tool_call", key))
    parts.append("Example tool call syntax:\n\n" + json.dumps(example, indent=2))
    if req.choice == "function":
        parts.append(f"Call the function `{req.name}`.")
    return "\n\n".join(parts)


def _arguments(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _history(messages: list[dict[str, Any]], caps: TemplateCaps) -> list[dict[str, Any]]:
    """Earlier turns as the template expects them (see the module docstring)."""
    names: dict[str, str] = {}
    out = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None)
        if m["role"] == "assistant" and calls:
            for c in calls:
                names[c["id"]] = c["function"]["name"]
            if caps.tool_calls:
                m["content"] = m.get("content") or ""
                m["tool_calls"] = [
                    {"id": c["id"], "type": "function",
                     "function": {"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])}}
                    for c in calls
                ]
            else:
                written = [{"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"]),
                            "id": c["id"]} for c in calls]
                body = {"tool_calls": written} if len(written) > 1 else {"tool_call": written[0]}
                text = m.get("content") or ""
                m["content"] = (text + "\n" if text else "") + json.dumps(body)
        elif m["role"] == "tool":
            call_id = m.get("tool_call_id", "")
            name = m.get("name") or names.get(call_id, "")
            if caps.tool_responses:
                m["name"] = name
            else:
                m = {"role": "user", "content": json.dumps(
                    {"tool_response": {"tool": name, "content": m.get("content") or "", "tool_call_id": call_id}})}
        if m.get("content") is None:
            m["content"] = ""
        out.append(m)
    return out


def _with_system(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    if messages and messages[0]["role"] in ("system", "developer"):
        first = dict(messages[0])
        first["content"] = f"{first.get('content') or ''}\n\n{text}".strip()
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def plan(messages: list[dict[str, Any]], *, req: ToolRequest | None, caps: TemplateCaps) -> ToolPlan:
    """Messages for the template, the grammar and the parsing for one request's tools."""
    history = _history(messages, caps)
    if req is None or req.choice == "none" or not req.functions:
        return ToolPlan(messages=history, template_tools=None, grammar="", format=caps.format, parse=False,
                        max_calls=None, named=False)
    fmt = caps.format
    template_tools = [f.as_tool() for f in req.functions] if caps.tools else None
    if fmt is ToolFormat.GENERIC:
        history = _with_system(history, _generic_system(req, describe_tools=not caps.tools))
    single = req.choice == "function" or not req.parallel or fmt is ToolFormat.LLAMA3
    return ToolPlan(
        messages=history,
        template_tools=template_tools,
        grammar=_grammar(req, fmt),
        format=fmt,
        parse=True,
        max_calls=1 if single else None,
        named=req.choice == "function",
        preserve=MARKERS[fmt],
    )


# ------------------------------------------------------------------ parsing
@dataclass
class Content:
    text: str


@dataclass
class CallStart:
    index: int
    id: str
    name: str


@dataclass
class CallArgs:
    index: int
    text: str


Event = Content | CallStart | CallArgs


class _Scan:
    """Where one JSON value ends, character by character (strings and nesting aware)."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_str = False
        self.esc = False
        self.started = False
        self.done = False

    def push(self, ch: str) -> bool:
        if self.done:
            return True
        if self.in_str:
            if self.esc:
                self.esc = False
            elif ch == "\\":
                self.esc = True
            elif ch == '"':
                self.in_str = False
                self.done = self.depth == 0
            return self.done
        if ch == '"':
            self.in_str = self.started = True
        elif ch in "{[":
            self.depth += 1
            self.started = True
        elif ch in "}]":
            self.depth -= 1
            self.done = self.depth <= 0
        elif not ch.isspace():
            self.started = True
        return self.done


_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


class _CallObject:
    """One call object while it is generated: `{"name": ..., "arguments": {...}, ...}`.

    With the name first (what the grammars force, and what models write), the call starts
    as soon as the name is complete and the arguments stream as raw JSON text; otherwise
    the whole object is parsed when it closes.
    """

    def __init__(self) -> None:
        self.raw = ""
        self.obj = _Scan()
        self.args: _Scan | None = None
        self.name: str | None = None
        self.arguments = ""

    @property
    def done(self) -> bool:
        return self.obj.done

    def push(self, ch: str) -> list[tuple[str, str]]:
        """Feed one character; returns ("name", name) and ("args", text) events."""
        self.raw += ch
        in_args = self.args is not None and not self.args.done
        closed = self.obj.push(ch)
        out: list[tuple[str, str]] = []
        if in_args:
            assert self.args is not None
            if not self.args.started and ch.isspace():
                pass
            elif ch in "}]" and self.args.depth == 0 and self.args.started:
                self.args.done = True  # a scalar ended by the enclosing object
            else:
                self.args.push(ch)
                self.arguments += ch
                out.append(("args", ch))
        elif self.name is None and not closed and len(self.raw) < 512:
            m = _CALL_HEAD.fullmatch(self.raw)
            if m:
                try:
                    self.name = json.loads(f'"{m.group(1)}"')
                except ValueError:
                    self.name = m.group(1)
                self.args = _Scan()
                out.append(("name", self.name))
        if closed and self.name is None:
            try:
                obj = json.loads(self.raw)
            except ValueError:
                return out
            if isinstance(obj, dict) and isinstance(obj.get("name"), str):
                args = obj.get("arguments", obj.get("parameters", {}))
                self.name = obj["name"]
                self.arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
                out += [("name", self.name), ("args", self.arguments)]
        return out


class _Held:
    """Text that may be the start of a marker is held back until it is known not to be."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.buf = ""

    def push(self, text: str) -> tuple[str, bool, str]:
        """(text before the marker, whether the marker was found, text after it)."""
        buf = self.buf + text
        i = buf.find(self.marker)
        if i >= 0:
            self.buf = ""
            return buf[:i], True, buf[i + len(self.marker):]
        keep = 0
        for k in range(min(len(self.marker) - 1, len(buf)), 0, -1):
            if buf.endswith(self.marker[:k]):
                keep = k
                break
        self.buf = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep], False, ""

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class _JsonString:
    """Decodes a JSON string's contents as they stream in (after its opening quote)."""

    def __init__(self) -> None:
        self.pending = ""  # an escape sequence not yet complete
        self.done = False

    def push(self, ch: str) -> str:
        if self.done:
            return ""
        if self.pending:
            self.pending += ch
            p = self.pending
            if p[1] != "u" and len(p) == 2 or p[1] == "u" and len(p) in (6, 12):
                if len(p) == 6 and 0xD800 <= int(p[2:6], 16) <= 0xDBFF:
                    return ""  # a high surrogate: wait for its pair
                self.pending = ""
                try:
                    return json.loads(f'"{p}"')  # type: ignore[no-any-return]
                except ValueError:
                    return p
            if len(p) > 12:
                self.pending = ""
                return p
            return ""
        if ch == "\\":
            self.pending = ch
            return ""
        if ch == '"':
            self.done = True
            return ""
        return ch


_GENERIC_HEAD = re.compile(r'\s*\{\s*"(tool_calls|tool_call|response)"\s*:\s*')


def _call_id(fmt: ToolFormat) -> str:
    if fmt is ToolFormat.MISTRAL:  # Mistral's templates require 9 alphanumerics
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    return f"call_{secrets.token_hex(12)}"


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str = ""


@dataclass
class ToolParser:
    """Splits a generated text into content and tool calls as it streams (see ToolFormat)."""

    format: ToolFormat
    max_calls: int | None = None
    calls: list[ParsedCall] = field(default_factory=list)
    content: str = ""
    new_id: Callable[[ToolFormat], str] = _call_id

    def __post_init__(self) -> None:
        self._state = "start"
        self._pre = ""  # text held while deciding what the output is
        self._held = _Held(MARKERS[self.format][0]) if self.format in (ToolFormat.HERMES, ToolFormat.MISTRAL) else None
        self._obj: _CallObject | None = None
        self._str: _JsonString | None = None
        self._closing = _Held("</tool_call>")
        self._out: list[Event] = []

    # ------------------------------------------------------------ events
    def _content(self, text: str) -> None:
        if not text or (self.calls and not text.strip()):
            return  # whitespace between and after calls is not content
        self.content += text
        if self._out and isinstance(self._out[-1], Content):
            self._out[-1].text += text
        else:
            self._out.append(Content(text))

    def _room(self) -> bool:
        return self.max_calls is None or len(self.calls) < self.max_calls

    def _call_events(self, obj: _CallObject, evs: list[tuple[str, str]], *, keep: bool) -> None:
        for kind, text in evs:
            if not keep:
                continue
            if kind == "name":
                self.calls.append(ParsedCall(id=self.new_id(self.format), name=text))
                self._out.append(CallStart(len(self.calls) - 1, self.calls[-1].id, text))
            elif self.calls:
                self.calls[-1].arguments += text
                last = self._out[-1] if self._out else None
                if isinstance(last, CallArgs) and last.index == len(self.calls) - 1:
                    last.text += text
                else:
                    self._out.append(CallArgs(len(self.calls) - 1, text))

    def _start_call(self) -> None:
        self._obj = _CallObject()
        self._keep = self._room()

    def _feed_call(self, ch: str) -> bool:
        """Feed one character to the current call object; True when it closed."""
        assert self._obj is not None
        self._call_events(self._obj, self._obj.push(ch), keep=self._keep)
        if not self._obj.done:
            return False
        if self._obj.name is None and self._keep:
            self._content(self._obj.raw)  # not a call after all: it was text
        self._obj = None
        return True

    def _array_char(self, ch: str) -> bool:
        """One character of an array of call objects; True when the array closed."""
        if self._obj is not None:
            self._feed_call(ch)
        elif ch == "{":
            self._start_call()
            self._feed_call(ch)
        elif ch == "]":
            return True
        return False

    # ------------------------------------------------------------- input
    def feed(self, text: str) -> list[Event]:
        self._out = []
        fmt = self.format
        if fmt in (ToolFormat.HERMES, ToolFormat.MISTRAL):
            self._feed_marked(text)
        elif fmt is ToolFormat.LLAMA3:
            self._feed_llama3(text)
        else:
            self._feed_generic(text)
        return self._out

    def finish(self) -> list[Event]:
        """The end of the output: whatever is still held is content (or a cut-off call)."""
        self._out = []
        free = self.format in (ToolFormat.HERMES, ToolFormat.LLAMA3)  # calls the model chose to write
        if self._obj is not None and self._obj.name is None and self._keep and free:
            # Not a call after all (or cut off before its name): it was text. In the array
            # and generic shapes a cut-off call is dropped: the grammar made it a call.
            prefix = MARKERS[self.format][0] if self.format is ToolFormat.HERMES else ""
            self._content(prefix + self._obj.raw)
        if self._held is not None:
            self._content(self._held.flush())
        if self._state in ("start", "undecided"):
            self._content(self._pre)
        self._pre = ""
        return self._out

    def _feed_marked(self, text: str) -> None:
        """Hermes (`<tool_call>` blocks) and Mistral (`[TOOL_CALLS]` then an array)."""
        assert self._held is not None
        while text:
            if self._state in ("start", "text"):
                self._state = "text"
                before, found, text = self._held.push(text)
                self._content(before)
                if not found:
                    return
                self._state = "call" if self.format is ToolFormat.HERMES else "array"
                if self._state == "call":
                    self._start_call()
            elif self._state == "call":  # hermes: inside <tool_call>
                i = 0
                while i < len(text) and self._obj is not None:
                    self._feed_call(text[i])
                    i += 1
                text = text[i:]
                if self._obj is None:
                    self._state = "closing"
            elif self._state == "closing":  # hermes: up to </tool_call>
                _, found, text = self._closing.push(text)
                if not found:
                    return
                self._state = "text"
            elif self._state == "array":  # mistral: [ call, call ]
                for i, ch in enumerate(text):
                    if self._array_char(ch):
                        self._state, text = "text", text[i + 1:]
                        break
                else:
                    text = ""

    def _feed_llama3(self, text: str) -> None:
        """Llama 3.x: the whole output is one JSON call (maybe after `<|python_tag|>`), or text."""
        if self._state == "start":
            self._pre += text
            s = self._pre.lstrip()
            tag = MARKERS[ToolFormat.LLAMA3][0]
            if s.startswith(tag):
                s = s[len(tag):].lstrip()
            elif tag.startswith(s):
                return  # maybe the tag, still arriving
            if not s:
                return
            if s[0] != "{":
                self._state = "text"
                self._content(self._pre)
                self._pre = ""
                return
            self._state, self._pre = "call", ""
            self._start_call()
            text = s
        if self._state == "call":
            i = 0
            while i < len(text) and self._obj is not None:
                self._feed_call(text[i])
                i += 1
            if self._obj is None:
                self._state = "text"
                self._content(text[i:])
        elif self._state == "text":
            self._content(text)

    def _feed_generic(self, text: str) -> None:
        """Generic: `{"response": "..."}`, `{"tool_call": {...}}` or `{"tool_calls": [...]}`."""
        if self._state == "start":
            self._pre += text
            m = _GENERIC_HEAD.match(self._pre)
            if not m:
                if len(self._pre) > 64 or (self._pre.strip() and not self._pre.lstrip().startswith("{")):
                    self._state = "text"
                    self._content(self._pre)
                    self._pre = ""
                return
            key, text = m.group(1), self._pre[m.end():]
            self._pre = ""
            self._state = {"response": "response", "tool_call": "call", "tool_calls": "array"}[key]
            self._str = None
        for ch in text:
            st = self._state
            if st == "text":
                self._content(ch)
            elif st == "response":
                if self._str is None:
                    if ch == '"':
                        self._str = _JsonString()
                elif not self._str.done:
                    self._content(self._str.push(ch))
                    if self._str.done:
                        self._state = "rest"
            elif st == "call":
                if self._obj is None:
                    if ch == "{":
                        self._start_call()
                        self._feed_call(ch)
                elif self._feed_call(ch):
                    self._state = "rest"
            elif st == "array" and self._array_char(ch):
                self._state = "rest"
