"""/v1/knowledge: upload, list, remove and search the service's knowledge base (same token as the API).

Parsing and embedding run in a worker thread; the event loop only moves bytes.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from easllm.errors import InvalidRequest, TooLarge
from easllm.protocol.knowledge import KnowledgeQuery, failure_dict, file_dict, hit_dict, parse_query
from easllm.protocol.schema import json_body, multipart_files
from easllm.rag.knowledge import FileNotInKnowledgeBase, IngestFailure
from easllm.rag.loaders import PARAM
from easllm.server.auth import require_token
from easllm.server.errors import error_body, error_response
from easllm.server.state import State

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/knowledge", dependencies=[Depends(require_token)])

MAX_FIELDS = 32  # form fields that are not files (none are needed)


@router.post("/files", response_model=None, openapi_extra=multipart_files())
async def upload_files(request: Request, state: State) -> JSONResponse:
    """Multipart upload of one or many files (any field name; `files` by convention).

    All added: 200 `{"files": [...]}`. Any refused: the first refusal's status (400, 413, 415) with
    the error, plus `files` (those added anyway) and `errors` (one per refused file)."""
    kb = state.knowledge
    limit = int(kb.config.max_file_mb * 1024 * 1024)
    max_files = state.config.limits.max_upload_files
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise InvalidRequest("send the files as multipart/form-data, e.g. curl -F files=@manual.pdf", PARAM)
    try:
        form = await request.form(max_files=max_files, max_fields=MAX_FIELDS)
    except HTTPException as exc:  # Starlette's multipart parser: too many parts, or a malformed body
        if "Too many files" in str(exc.detail):
            raise TooLarge(f"send at most {max_files} files per upload (--max-upload-files)", PARAM) from exc
        raise InvalidRequest(f"the multipart body is malformed: {exc.detail}", PARAM) from exc
    try:
        uploads = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        if not uploads:
            raise InvalidRequest("the upload holds no files: send them as multipart file fields", PARAM)
        items: list[tuple[str, bytes]] = []
        refused: list[IngestFailure] = []
        for upload in uploads:
            name = upload.filename or ""
            if upload.size is not None and upload.size > limit:
                message = f"{name} is {upload.size} bytes; the limit is {kb.config.max_file_mb:g} MB"
                refused.append(IngestFailure(name, TooLarge.status, message))
                continue
            items.append((name, await upload.read()))
    finally:
        await form.close()
    added, failed = await asyncio.to_thread(kb.add_files, items) if items else ([], [])
    refused += failed
    files = [file_dict(f) for f in added]
    if not refused:
        return JSONResponse({"files": files})
    first = refused[0]
    message = first.message if len(refused) == 1 else "; ".join(f.message for f in refused)
    body = error_body(first.status, message, PARAM)
    body.update(files=files, errors=[failure_dict(f) for f in refused])
    return JSONResponse(body, status_code=first.status)


@router.get("/files")
async def list_files(state: State) -> JSONResponse:
    kb = state.knowledge
    stored, chunks = await asyncio.to_thread(lambda: (kb.files(), kb.chunk_count()))  # a database read
    files = [file_dict(f) for f in stored]
    return JSONResponse({"files": files, "chunks": chunks, "embedding_model": kb.embedder_name})


@router.delete("/files/{name}")
async def remove_file(name: str, state: State) -> JSONResponse:
    kb = state.knowledge
    try:
        removed = await asyncio.to_thread(kb.remove_file, name)
    except FileNotInKnowledgeBase:
        return error_response(404, f"no file named {name!r} in the knowledge base", "name")
    return JSONResponse({"deleted": file_dict(removed)})


@router.post("/query", openapi_extra=json_body(KnowledgeQuery))
async def query(request: Request, state: State) -> JSONResponse:
    """`{"query": text, "top_k"?, "score_threshold"?}` -> the nearest chunks, best first."""
    kb = state.knowledge
    q = parse_query(await request.body())
    hits = await asyncio.to_thread(kb.search, q.query, q.top_k, q.score_threshold)
    return JSONResponse({"query": q.query, "results": [hit_dict(h) for h in hits]})
