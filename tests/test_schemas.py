"""The JSON Schemas `edge-agent schema` exports for the MQTT payloads: each declares its
dialect and every `$ref` in it resolves inside the same document (the command envelope
once pointed at `#/$defs/DeployCommand` while its definitions sat under
`properties.signed`, which no validator can follow)."""

from __future__ import annotations

from typing import Any

import pytest

from agent.link.wire import JSON_SCHEMA_DIALECT, json_schemas


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref}: only references into the same document"
    node: Any = doc
    for raw in ref[2:].split("/"):
        part = raw.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref}: no {part!r}"
        node = node[part]
    return node


@pytest.mark.parametrize("topic", sorted(json_schemas()))
def test_every_schema_declares_its_dialect_and_resolves_its_references(topic: str) -> None:
    schema = json_schemas()[topic]
    assert schema["$schema"] == JSON_SCHEMA_DIALECT
    for ref in _refs(schema):
        assert isinstance(_resolve(schema, ref), dict)


def test_the_command_envelope_has_the_command_definitions_at_its_root() -> None:
    cmd = json_schemas()["cmd"]
    refs = _refs(cmd["properties"]["signed"])
    assert refs, "the command schema references its kinds"
    assert "$defs" not in cmd["properties"]["signed"]
    assert any("DeployCommand" in r for r in refs)
