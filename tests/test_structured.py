"""JSON schemas to grammars: what is enforced compiles (llama.cpp accepts the grammar), what
would not be enforced is refused naming the keyword and where it is."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any, Optional

import pytest
from openai.lib._pydantic import to_strict_json_schema
from pydantic import BaseModel, Field

from appliance.head.structured import SchemaError, check_schema, json_object_grammar, schema_grammar
from appliance.head.text import Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_model: Path) -> Tokenizer:
    return Tokenizer(str(tiny_model))


class Kind(str, enum.Enum):
    cat = "cat"
    dog = "dog"


class Owner(BaseModel):
    name: str = Field(max_length=20)
    email: Optional[str] = None


class Pet(BaseModel):
    kind: Kind
    name: str
    age: int
    weight: float
    vaccinated: bool
    owners: list[Owner] = Field(max_length=3)
    nickname: Optional[str]


GOOD = [
    pytest.param(to_strict_json_schema(Pet), id="pydantic-strict-as-openai-sends-it"),
    pytest.param(Pet.model_json_schema(), id="pydantic-plain"),
    pytest.param({"type": "object", "properties": {"d": {"type": "string", "format": "date-time"},
                                                   "u": {"type": "string", "format": "uuid"}}}, id="formats"),
    pytest.param({"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3,5}$"}, id="anchored-pattern"),
    pytest.param({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]}, id="tuple"),
    pytest.param({"$ref": "#/$defs/node", "$defs": {"node": {"type": "object", "properties": {
        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}}}}}, id="recursive-ref"),
    pytest.param({"type": ["string", "null"]}, id="type-list"),
    pytest.param({"type": "object", "additionalProperties": {"type": "integer"}}, id="map"),
]


@pytest.mark.parametrize("schema", GOOD)
def test_supported_schemas_compile_to_grammars_llama_cpp_accepts(tok: Tokenizer, schema: dict[str, Any]) -> None:
    grammar = schema_grammar(schema)
    assert "root ::=" in grammar and tok.check_grammar(grammar)


def test_json_object_grammar_compiles(tok: Tokenizer) -> None:
    assert tok.check_grammar(json_object_grammar())


def test_constraints_beside_a_list_of_types_are_kept() -> None:
    """The converter alone drops them: `maxLength` would not bound the string."""
    grammar = schema_grammar({"type": ["string", "null"], "maxLength": 3})
    assert "(char (char (char)?)?)?" in grammar


def test_strings_never_hold_raw_control_characters() -> None:
    """The converter's own string rule lets raw newlines into strings, which JSON forbids."""
    grammar = schema_grammar({"type": "string"})
    char = next(line for line in grammar.splitlines() if line.startswith("char ::="))
    assert "\\x00-\\x1F" in char


BAD = [
    pytest.param({"type": "integer", "minimum": 0}, "'minimum' is not supported (at #)", id="minimum"),
    pytest.param({"type": "object", "properties": {"a": {"type": "number", "multipleOf": 2}}},
                 "'multipleOf' is not supported (at #/properties/a)", id="nested-multipleOf"),
    pytest.param({"not": {"type": "string"}}, "'not' is not supported", id="not"),
    pytest.param({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "'uniqueItems'", id="uniqueItems"),
    pytest.param({"if": {}, "then": {}}, "'if', 'then' are not supported", id="if-then"),
    pytest.param({"type": "object", "patternProperties": {"^a": {}}}, "'patternProperties'", id="patternProperties"),
    pytest.param({"$ref": "https://example.com/schema.json"}, "only local references", id="remote-ref"),
    pytest.param({"$ref": "#/$defs/missing"}, "does not resolve", id="dangling-ref"),
    pytest.param({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "'required' names 'b'", id="required-unknown"),
    pytest.param({"type": "string", "format": "email"}, "format 'email' is not supported", id="format-email"),
    pytest.param({"type": "string", "pattern": "abc"}, "must be anchored", id="unanchored-pattern"),
    pytest.param({"type": "string", "pattern": "^\\d+$"}, "escapes such as \\d", id="pattern-escape"),
    pytest.param({"type": "string", "pattern": "^a.b$"}, "'.'", id="pattern-dot"),
    pytest.param({"type": "string", "pattern": "^(?=a)b$"}, "lookarounds", id="pattern-lookahead"),
    pytest.param({"type": "string", "pattern": "^a{5000}$"}, "repeats more than", id="pattern-huge-repeat"),
    pytest.param({"type": "array", "maxItems": 10**9}, "'maxItems' must be an integer from 0 to", id="huge-maxItems"),
    pytest.param({"type": "string", "minLength": 5, "maxLength": 2}, "'minLength' is larger", id="min-above-max"),
    pytest.param({"enum": ["a"], "maxLength": 3}, "beside 'enum'", id="ignored-beside-enum"),
    pytest.param({"type": "strnig"}, "type 'strnig'", id="typo-type"),
    pytest.param({"properties": {"a": True}}, "must be a JSON object (at #/properties/a)", id="boolean-subschema"),
    pytest.param({"allOf": [{"type": "string"}, {"maxLength": 2}]}, "'allOf' is supported only", id="allOf-non-object"),
]


@pytest.mark.parametrize("schema, message", BAD)
def test_what_the_grammar_would_not_enforce_is_refused_by_name(schema: dict[str, Any], message: str) -> None:
    with pytest.raises(SchemaError) as info:
        check_schema(schema)
    assert message in str(info.value)


def test_deep_or_huge_schemas_are_refused() -> None:
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(SchemaError, match="nests deeper"):
        check_schema(deep)
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(3000)}}
    with pytest.raises(SchemaError, match="more than"):
        check_schema(wide)
