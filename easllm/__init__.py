"""easllm: self-hosted LLM deployment (EAS protocol, WebSocket, OpenAI API, RAG, WebUI)."""

__version__ = "0.1.0"
