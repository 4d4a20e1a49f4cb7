"""The WebUI: a Gradio page with a Chat tab and a knowledge-base tab, served at /webui/.

Importing it imports Gradio (seconds), so `easllm.app.create_app` imports it only when the WebUI is served.
"""

from __future__ import annotations

import os

# Before Gradio is imported: no analytics or version checks leave the machine.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from easllm.webui.mount import WEBUI_PATH, LazyWebUI, mount_webui

__all__ = ["WEBUI_PATH", "LazyWebUI", "mount_webui"]
