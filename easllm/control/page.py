"""`GET /`: the console page (one static HTML file; it talks to the REST API with the admin token).

The page is served with a Content-Security-Policy that runs only its own inline script and style
(by hash), talks only to this origin and cannot be framed (clickjacking), and `X-Frame-Options`
for older browsers.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(include_in_schema=False)


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@functools.cache
def page() -> tuple[str, dict[str, str]]:
    html = files("easllm.control").joinpath("page.html").read_text(encoding="utf-8")
    scripts = " ".join(_hash(s) for s in re.findall(r"<script>(.*?)</script>", html, re.S))
    styles = " ".join(_hash(s) for s in re.findall(r"<style>(.*?)</style>", html, re.S))
    policy = (
        f"default-src 'none'; script-src {scripts}; style-src {styles}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    headers = {
        "Cache-Control": "no-store",
        "Content-Security-Policy": policy,
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    return html, headers


@router.get("/", response_class=HTMLResponse)
async def console_page() -> HTMLResponse:
    html, headers = page()
    return HTMLResponse(html, headers=headers)
