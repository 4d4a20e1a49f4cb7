"""OpenAPI request bodies of the routes that parse their own bodies (so they can answer every
malformed one with a 400 naming the field): the served `/openapi.json` still documents them, and
schemathesis can fuzz them.

    @router.post("/v1/embeddings", openapi_extra=json_body(EmbeddingRequest))
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its `$defs` inlined (request models are not recursive)."""
    schema = model.model_json_schema(mode="validation")
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    inlined: dict[str, Any] = resolve(schema)
    return inlined


def json_body(model: type[BaseModel], *, plain_text: str | None = None) -> dict[str, Any]:
    """`openapi_extra` for a JSON body of `model`; with `plain_text`, a text/plain body too."""
    content: dict[str, Any] = {"application/json": {"schema": inline_schema(model)}}
    if plain_text is not None:
        content["text/plain"] = {"schema": {"type": "string", "description": plain_text}}
    return {"requestBody": {"required": True, "content": content}}


def multipart_files(field: str = "files") -> dict[str, Any]:
    """`openapi_extra` for a multipart upload of one or more files."""
    files = {"type": "array", "items": {"type": "string", "format": "binary"}}
    schema = {"type": "object", "properties": {field: files}, "required": [field]}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}
