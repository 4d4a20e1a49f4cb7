"""The knowledge-base API (/v1/knowledge/...): the query request and the reply shapes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StrictStr

from easllm.errors import InvalidRequest
from easllm.protocol.validation import load_json, validate
from easllm.rag.knowledge import IngestFailure
from easllm.rag.store import Hit, StoredFile


class KnowledgeQuery(BaseModel):
    """`POST /v1/knowledge/query`: `{"query": "...", "top_k": 3, "score_threshold": 0.5}`."""

    model_config = ConfigDict(extra="ignore")

    query: StrictStr = Field(validation_alias=AliasChoices("query", "text", "prompt"))
    top_k: int | None = Field(None, ge=1, le=100)
    score_threshold: float | None = Field(None, ge=-1, le=1)


def parse_query(body: bytes) -> KnowledgeQuery:
    data = load_json(body or b"null")
    if not isinstance(data, dict):
        raise InvalidRequest('send a JSON object: {"query": "..."}', "body")
    query: KnowledgeQuery = validate(KnowledgeQuery, data)
    if not query.query.strip():
        raise InvalidRequest("query is empty", "query")
    return query


def file_dict(f: StoredFile) -> dict[str, Any]:
    return {
        "name": f.name,
        "type": f.kind,
        "size": f.size,
        "chunks": f.chunks,
        "pages": f.pages,
        "added_at": datetime.fromtimestamp(f.added_at, UTC).isoformat(timespec="seconds"),
        "sha256": f.sha256,
    }


def hit_dict(hit: Hit) -> dict[str, Any]:
    c = hit.chunk
    return {
        "source": c.source,
        "page": c.page,
        "heading": c.heading,
        "content": c.content,
        "score": round(hit.score, 4),
    }


def failure_dict(f: IngestFailure) -> dict[str, Any]:
    return {"name": f.name, "code": f.status, "message": f.message}
