"""Structured outputs: a JSON schema from the network, checked and compiled to a grammar.

`response_format` (json_object, json_schema) and tool calls are enforced while sampling by
llama.cpp's grammar sampler in the engine; this module turns the request's JSON schema into
that grammar with llama-cpp-python's own converter (`llama_cpp.llama_grammar`, a port of
llama.cpp's json-schema-to-grammar), so that no converter of ours can drift from it.

The converter silently ignores the keywords it cannot enforce (`minimum`, `not`,
`uniqueItems`, ...) and accepts some it mistranslates; an output that does not match the
schema is exactly what a tool must never get. So every schema is walked first and any
keyword or shape the grammar would not enforce is refused with a `SchemaError` naming it
and where it is (the API answers 400). What is supported, and why each restriction exists,
is the table below. Sizes are bounded too: the schema is hostile input, and a `maxItems`
of a billion would make the converter build a billion-item rule.
"""

from __future__ import annotations

import json
import re
from typing import Any

# Keywords that constrain nothing: accepted anywhere and ignored.
ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly",
     "writeOnly", "$defs", "definitions", "discriminator", "strict"}
)
# Keywords the grammar enforces.
SUPPORTED = frozenset(
    {"type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
     "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "pattern", "format", "minLength", "maxLength"}
)
TYPES = frozenset({"string", "number", "integer", "boolean", "null", "object", "array"})
FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"})
# A schema whose kind is decided by one of these keywords ignores the constraints beside it.
DECIDING = ("$ref", "anyOf", "oneOf", "const", "enum")

MAX_DEPTH = 32
MAX_NODES = 2000
MAX_REPEAT = 1000  # largest minItems/maxItems/minLength/maxLength and pattern quantifier
MAX_PATTERN = 1000
MAX_GRAMMAR = 256 * 1024

# The converter's string characters allow raw control characters, which JSON forbids.
_CHAR_RULE = 'char ::= [^"\\\\] |'
_CHAR_RULE_JSON = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'

_QUANT = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


class SchemaError(ValueError):
    """The schema cannot be enforced: the message names the keyword and where it is."""


def _where(path: tuple[str, ...]) -> str:
    return "#/" + "/".join(path) if path else "#"


def check_schema(schema: Any) -> None:
    """Raise SchemaError unless the grammar made from `schema` enforces all of it."""
    if not isinstance(schema, dict):
        raise SchemaError("the schema must be a JSON object")
    count = [0]
    defs: dict[str, Any] = {}

    def visit(node: Any, path: tuple[str, ...], depth: int) -> None:
        count[0] += 1
        if count[0] > MAX_NODES:
            raise SchemaError(f"the schema has more than {MAX_NODES} subschemas")
        if depth > MAX_DEPTH:
            raise SchemaError(f"the schema nests deeper than {MAX_DEPTH} levels (at {_where(path)})")
        if not isinstance(node, dict):
            raise SchemaError(f"a subschema must be a JSON object (at {_where(path)})")
        at = f"(at {_where(path)})"
        unknown = sorted(k for k in node if k not in SUPPORTED and k not in ANNOTATIONS)
        unknown = [k for k in unknown if not (k == "uniqueItems" and node[k] is False)]
        if unknown:
            raise SchemaError(
                f"{', '.join(repr(k) for k in unknown)} {'is' if len(unknown) == 1 else 'are'} not supported {at}; "
                f"supported keywords: {', '.join(sorted(SUPPORTED))}"
            )
        deciding = [k for k in DECIDING if k in node]
        if deciding:
            ignored = sorted(k for k in node if k in SUPPORTED and k not in (deciding[0], "type"))
            if ignored:
                raise SchemaError(
                    f"{', '.join(repr(k) for k in ignored)} beside {deciding[0]!r} is not supported {at}"
                )
        t = node.get("type")
        for one in t if isinstance(t, list) else ([t] if t is not None else []):
            if one not in TYPES:
                raise SchemaError(f"type {one!r} is not a JSON schema type {at}")
        if "$ref" in node:
            ref = node["$ref"]
            if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
                raise SchemaError(f"only local references ('#/...') are supported, not {ref!r} {at}")
            target: Any = schema
            for part in ref[2:].split("/") if ref != "#" else []:
                part = part.replace("~1", "/").replace("~0", "~")
                if not isinstance(target, dict) or part not in target:
                    raise SchemaError(f"the reference {ref!r} does not resolve {at}")
                target = target[part]
            defs[ref] = target
        for key in ("anyOf", "oneOf", "allOf"):
            if key in node:
                alts = node[key]
                if not isinstance(alts, list) or not alts:
                    raise SchemaError(f"{key!r} must be a non-empty list {at}")
                for i, alt in enumerate(alts):
                    visit(alt, (*path, key, str(i)), depth + 1)
                if key == "allOf" and not all(
                    isinstance(a, dict) and ("properties" in a or "$ref" in a) for a in alts
                ):
                    raise SchemaError(f"'allOf' is supported only over object schemas with properties {at}")
        if "enum" in node and (not isinstance(node["enum"], list) or not node["enum"]):
            raise SchemaError(f"'enum' must be a non-empty list {at}")
        props = node.get("properties", {})
        if not isinstance(props, dict):
            raise SchemaError(f"'properties' must be an object {at}")
        for name, sub in props.items():
            visit(sub, (*path, "properties", name), depth + 1)
        required = node.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise SchemaError(f"'required' must be a list of property names {at}")
        missing = [r for r in required if r not in props]
        if missing and "allOf" not in node:
            raise SchemaError(f"'required' names {missing[0]!r}, which is not in 'properties' {at}")
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            visit(extra, (*path, "additionalProperties"), depth + 1)
        elif extra is not None and not isinstance(extra, bool):
            raise SchemaError(f"'additionalProperties' must be a boolean or a schema {at}")
        items = node.get("items")
        if isinstance(items, list):
            for i, sub in enumerate(items):
                visit(sub, (*path, "items", str(i)), depth + 1)
        elif items is not None:
            visit(items, (*path, "items"), depth + 1)
        if "prefixItems" in node:
            if "items" in node or not isinstance(node["prefixItems"], list):
                raise SchemaError(f"'prefixItems' is supported alone, as a list, without 'items' {at}")
            for i, sub in enumerate(node["prefixItems"]):
                visit(sub, (*path, "prefixItems", str(i)), depth + 1)
        for key in ("minItems", "maxItems", "minLength", "maxLength"):
            if key in node:
                v = node[key]
                if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_REPEAT:
                    raise SchemaError(f"{key!r} must be an integer from 0 to {MAX_REPEAT} {at}")
        for lo, hi in (("minItems", "maxItems"), ("minLength", "maxLength")):
            if lo in node and hi in node and node[lo] > node[hi]:
                raise SchemaError(f"{lo!r} is larger than {hi!r} {at}")
        if ("minItems" in node or "maxItems" in node) and isinstance(items, list):
            raise SchemaError(f"'minItems'/'maxItems' are not supported with a list of 'items' {at}")
        if "format" in node:
            if node["format"] not in FORMATS:
                raise SchemaError(
                    f"format {node['format']!r} is not supported {at}; supported formats: {', '.join(sorted(FORMATS))}"
                )
            if {"pattern", "minLength", "maxLength"} & set(node):
                raise SchemaError(f"'format' together with 'pattern' or a length is not supported {at}")
        if "pattern" in node:
            _check_pattern(node["pattern"], at)
            if {"minLength", "maxLength"} & set(node):
                raise SchemaError(f"'pattern' together with 'minLength'/'maxLength' is not supported {at}")
        for key in ("$defs", "definitions"):
            if isinstance(node.get(key), dict):
                for name, sub in node[key].items():
                    visit(sub, (*path, key, name), depth + 1)

    visit(schema, (), 0)


def _check_pattern(pattern: Any, at: str) -> None:
    if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN:
        raise SchemaError(f"'pattern' must be a string of at most {MAX_PATTERN} characters {at}")
    if not (pattern.startswith("^") and pattern.endswith("$")) or len(pattern) < 2:
        raise SchemaError(f"'pattern' must be anchored: start with '^' and end with '$' {at}")
    body = pattern[1:-1]
    # What the converter would turn into characters JSON does not allow unescaped in a
    # string (a quote, a backslash, control characters) or cannot translate at all.
    if '"' in body:
        raise SchemaError(f"'pattern' with a double quote is not supported {at}")
    if "[^" in body or re.search(r"(?<!\\)\.", re.sub(r"\[[^\]]*\]", "", body)):
        raise SchemaError(f"'pattern' with '.' or a negated class '[^...]' is not supported {at}")
    if re.search(r"\\[^.^$|?*+()\[\]{}\-/]", body):
        raise SchemaError(f"'pattern' with escapes such as \\d, \\w or \\s is not supported (use classes like [0-9]) {at}")
    if re.search(r"\(\?", body):
        raise SchemaError(f"'pattern' with lookarounds or non-capturing groups '(?' is not supported {at}")
    for m in _QUANT.finditer(body):
        for g in m.groups():
            if g and int(g) > MAX_REPEAT:
                raise SchemaError(f"'pattern' repeats more than {MAX_REPEAT} times {at}")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise SchemaError(f"'pattern' is not a valid regular expression ({exc}) {at}") from None


_VALUES = frozenset({"enum", "const", "default", "examples"})


def _split_type_lists(node: Any) -> Any:
    """`{"type": ["string", "null"], "maxLength": 5}` as `anyOf` one schema per type: the
    converter would drop every keyword beside a list of types (the length, here)."""
    if isinstance(node, list):
        return [_split_type_lists(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: (v if k in _VALUES else _split_type_lists(v)) for k, v in node.items()}
    types = out.get("type")
    if isinstance(types, list) and any(k in SUPPORTED and k != "type" for k in out):
        keep = {k: v for k, v in out.items() if k in ANNOTATIONS}
        branch = {k: v for k, v in out.items() if k not in ANNOTATIONS}
        return {**keep, "anyOf": [{**branch, "type": t} for t in types]}
    return out


def schema_rules(schema: dict[str, Any], *, name: str) -> tuple[str, str]:
    """GBNF rules for `schema` (checked with `check_schema` first), and the name of its rule.

    `name=""` makes the schema the grammar's `root`; another name lets a caller build a
    root of its own around it (a tool call's markers around the arguments object).
    """
    from llama_cpp.llama_grammar import SchemaConverter

    check_schema(schema)
    conv = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    schema = _split_type_lists(json.loads(json.dumps(schema)))
    if "$ref" in schema:
        # The converter does not rewrite the references inside $defs when the root itself
        # is a reference: make the root an alternative of one, which it handles.
        schema = {**{k: v for k, v in schema.items() if k != "$ref"}, "anyOf": [{"$ref": schema["$ref"]}]}
    try:
        resolved = conv.resolve_refs(schema, "input")
        rule = conv.visit(resolved, name)
        grammar = conv.format_grammar()
    except (AssertionError, ValueError, KeyError, TypeError, IndexError, RecursionError) as exc:
        raise SchemaError(f"the schema cannot be turned into a grammar: {str(exc)[:300]}") from None
    grammar = grammar.replace(_CHAR_RULE, _CHAR_RULE_JSON)
    if len(grammar) > MAX_GRAMMAR:
        raise SchemaError(f"the schema's grammar is larger than {MAX_GRAMMAR // 1024} KiB")
    return grammar, rule


def schema_grammar(schema: dict[str, Any]) -> str:
    """The grammar for JSON matching `schema` (root rule `root`)."""
    return schema_rules(schema, name="")[0]


def json_object_grammar() -> str:
    """The grammar for any JSON object (`response_format: json_object`)."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return JSON_GBNF

