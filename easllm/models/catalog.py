"""The source document's supported-model list: name -> Hugging Face repo, size, context, precision."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    repo_id: str
    params_b: float  # billions of parameters
    context_length: int
    precision: str  # default precision on GPU


def _entry(name: str, repo_id: str, params_b: float, ctx: int, precision: str = "bf16") -> CatalogEntry:
    return CatalogEntry(name, repo_id, params_b, ctx, precision)


CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in [
        _entry("qwen2-7b", "Qwen/Qwen2-7B-Instruct", 7.6, 32768),
        _entry("qwen1.5-1.8b", "Qwen/Qwen1.5-1.8B-Chat", 1.8, 32768),
        _entry("qwen1.5-7b", "Qwen/Qwen1.5-7B-Chat", 7.7, 32768),
        _entry("qwen1.5-14b", "Qwen/Qwen1.5-14B-Chat", 14.2, 32768),
        _entry("llama3-8b", "meta-llama/Meta-Llama-3-8B-Instruct", 8.0, 8192),
        _entry("llama2-7b", "meta-llama/Llama-2-7b-chat-hf", 6.7, 4096, "fp16"),
        _entry("llama2-13b", "meta-llama/Llama-2-13b-chat-hf", 13.0, 4096, "fp16"),
        _entry("chatglm3-6b", "THUDM/chatglm3-6b", 6.2, 8192, "fp16"),
        _entry("baichuan2-7b", "baichuan-inc/Baichuan2-7B-Chat", 7.5, 4096),
        _entry("baichuan2-13b", "baichuan-inc/Baichuan2-13B-Chat", 13.9, 4096),
        _entry("falcon-7b", "tiiuae/falcon-7b-instruct", 7.2, 2048),
        _entry("yi-6b", "01-ai/Yi-6B-Chat", 6.1, 4096),
        _entry("mistral-7b-instruct-v0.2", "mistralai/Mistral-7B-Instruct-v0.2", 7.2, 32768),
        _entry("gemma-2b-it", "google/gemma-2b-it", 2.5, 8192),
        _entry("gemma-7b-it", "google/gemma-7b-it", 8.5, 8192),
        _entry("deepseek-coder-7b-instruct-v1.5", "deepseek-ai/deepseek-coder-7b-instruct-v1.5", 6.9, 4096),
    ]
}


def catalog_entry(name: str) -> CatalogEntry | None:
    key = name.strip().lower()
    return CATALOG.get(key) or next((e for e in CATALOG.values() if e.repo_id.lower() == key), None)
