"""The JSON schemas the Gemini generator asks for (sent as the SDK's `response_json_schema`) and
the check of a reply against them and the lesson contract (generation.check_plan / check_section):
a ValueError naming the first place a reply breaks them, which the generator's repair call quotes."""

from __future__ import annotations

from typing import Any

from common.lessons.generation import check_plan, check_section

_TEXT = {"type": "string", "minLength": 1}


def plan_schema(sections: int) -> dict[str, Any]:
    brief = {
        "type": "object",
        "properties": {"heading": _TEXT, "brief": _TEXT},
        "required": ["heading", "brief"],
    }
    return {
        "type": "object",
        "properties": {
            "title": {"type": "string", "minLength": 1, "maxLength": 200},
            "summary": _TEXT,
            "sections": {"type": "array", "items": brief, "minItems": sections, "maxItems": sections},
        },
        "required": ["title", "summary", "sections"],
    }


SECTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "heading": _TEXT,
        "body": _TEXT,
        "key_points": {"type": "array", "items": _TEXT, "minItems": 2, "maxItems": 5},
        "quiz": {
            "type": "object",
            "properties": {
                "question": _TEXT,
                "options": {"type": "array", "items": _TEXT, "minItems": 3, "maxItems": 4},
                "answer_index": {"type": "integer", "minimum": 0, "maximum": 3},
            },
            "required": ["question", "options", "answer_index"],
        },
    },
    "required": ["heading", "body", "key_points", "quiz"],
}

_TYPES: dict[str, Any] = {"object": dict, "array": list, "string": str, "integer": int}


def check_schema(value: Any, schema: dict[str, Any], where: str = "reply") -> None:
    """ValueError naming the first place `value` breaks `schema` (the subset of JSON Schema that
    the schemas above use: type, properties, required, items, min/maxItems, min/maxLength,
    minimum/maximum). Extra properties are allowed, as the model may add some."""
    kind = schema["type"]
    if not isinstance(value, _TYPES[kind]) or (kind == "integer" and isinstance(value, bool)):
        raise ValueError(f"{where} must be a JSON {kind}")
    if kind == "object":
        for name in schema.get("required", ()):
            if name not in value:
                raise ValueError(f"{where} lacks `{name}`")
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                check_schema(value[name], sub, f"{where}.{name}")
    elif kind == "array":
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        if len(value) < low or (high is not None and len(value) > high):
            raise ValueError(f"{where} must have {low} to {high or 'any number of'} items, has {len(value)}")
        for index, item in enumerate(value):
            check_schema(item, schema["items"], f"{where}[{index}]")
    elif kind == "string":
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        if len(value.strip()) < low or (high is not None and len(value) > high):
            raise ValueError(f"{where} must be a text of {low} to {high or 'any number of'} characters")
    elif value < schema.get("minimum", value) or value > schema.get("maximum", value):
        raise ValueError(f"{where} must be between {schema.get('minimum')} and {schema.get('maximum')}")


def checked_plan(value: Any, sections: int) -> dict[str, Any]:
    """The plan as the lesson contract stores it, or ValueError / TypeError saying what is wrong."""
    check_schema(value, plan_schema(sections))
    return check_plan(value)


def checked_section(value: Any, index: int) -> dict[str, Any]:
    """Section `index` as the contract keeps it, or ValueError / TypeError saying what is wrong."""
    check_schema(value, SECTION_SCHEMA)
    if value["quiz"]["answer_index"] >= len(value["quiz"]["options"]):
        raise ValueError("reply.quiz.answer_index must name one of the options")
    return check_section(value, index)
