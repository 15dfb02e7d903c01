"""Validate a decoded JSON body against a definition from ``schema.py``.

Returns the first problem as a serde-style sentence (``missing field `x```,
``unknown field `y`, expected one of ...``, ``invalid type: ...``), or None when valid.
"""

from __future__ import annotations

import re
from typing import Any

from firecracker_conformance.schema import DEFINITIONS


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    if isinstance(value, str):
        return f'string "{value}"'
    if isinstance(value, list):
        return "a sequence"
    return "a map"


_EXPECT = {
    "string": "a string",
    "integer": "an integer",
    "boolean": "a boolean",
    "array": "a sequence",
    "object": "a struct",
}


def _type_ok(value: Any, t: str) -> bool:
    if t == "string":
        return isinstance(value, str)
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "boolean":
        return isinstance(value, bool)
    if t == "array":
        return isinstance(value, list)
    if t == "object":
        return isinstance(value, dict)
    raise ValueError(f"unknown schema type {t!r}")


def validate(value: Any, schema: dict[str, Any] | str, where: str = "") -> str | None:
    if isinstance(schema, str):
        schema = DEFINITIONS[schema]
    if "$ref" in schema:
        return validate(value, DEFINITIONS[schema["$ref"]], where)
    at = f" at `{where}`" if where else ""
    t = schema.get("type")
    if t and not _type_ok(value, t):
        return f"invalid type: {_kind(value)}, expected {_EXPECT[t]}{at}"
    if t == "object":
        props: dict[str, Any] = schema.get("properties", {})
        if schema.get("strict"):
            for key in value:
                if key not in props:
                    names = ", ".join(f"`{k}`" for k in props)
                    return f"unknown field `{key}`, expected one of {names}{at}"
        for key in schema.get("required", []):
            if key not in value:
                return f"missing field `{key}`{at}"
        for key, sub in props.items():
            if key in value:
                err = validate(value[key], sub, f"{where}.{key}" if where else key)
                if err:
                    return err
    elif t == "array":
        for i, item in enumerate(value):
            err = validate(item, schema.get("items", {}), f"{where}[{i}]")
            if err:
                return err
    if "enum" in schema and value not in schema["enum"]:
        names = ", ".join(f"`{v}`" for v in schema["enum"])
        return f"unknown variant `{value}`, expected one of {names}{at}"
    if "enum_ci" in schema and str(value).lower() not in [v.lower() for v in schema["enum_ci"]]:
        names = ", ".join(f"`{v}`" for v in schema["enum_ci"])
        return f"unknown variant `{value}`, expected one of {names}{at}"
    if "minimum" in schema and value < schema["minimum"]:
        return f"invalid value: {_kind(value)}, expected at least {schema['minimum']}{at}"
    if "maximum" in schema and value > schema["maximum"]:
        return f"invalid value: {_kind(value)}, expected at most {schema['maximum']}{at}"
    if "pattern" in schema and not re.match(schema["pattern"], value):
        return f"invalid value: {_kind(value)}, expected a value matching {schema['pattern']}{at}"
    return None
