"""The source document's supported-model list: where each model's weights live, per format.

A model names its safetensors repository (transformers, vLLM), its ModelScope mirror, and where a
GGUF build exists (llama.cpp) the repository and file of each quantization. A GGUF build is
listed only where a known publisher ships one; the others run on transformers or vLLM, or on a
GGUF repo the user names (`--model-path ORG/REPO-GGUF:Q4_K_M`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_QUANT = "Q4_K_M"  # what llama.cpp runs on a CPU unless --quantization says otherwise


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    repo_id: str  # safetensors weights on the Hugging Face Hub
    params_b: float  # billions of parameters
    context_length: int
    precision: str  # default precision on GPU
    modelscope_id: str = ""  # the same weights on ModelScope; "" = same id as repo_id
    gguf_repo: str = ""  # "" = no GGUF build known
    gguf_files: dict[str, str] = field(default_factory=dict)  # quantization (upper case) -> file

    @property
    def ms_repo_id(self) -> str:
        return self.modelscope_id or self.repo_id


def _gguf(pattern: str, *quants: str, lower: bool = True) -> dict[str, str]:
    """`pattern` with `{q}` replaced by each quantization (lower case unless `lower` is false)."""
    return {q: pattern.format(q=q.lower() if lower else q) for q in quants}


K_QUANTS = ("Q4_K_M", "Q5_K_M", "Q8_0")
THEBLOKE = ("Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")

# fmt: off
CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in [
        CatalogEntry(
            "qwen2-7b", "Qwen/Qwen2-7B-Instruct", 7.6, 32768, "bf16", "qwen/Qwen2-7B-Instruct",
            "Qwen/Qwen2-7B-Instruct-GGUF", _gguf("qwen2-7b-instruct-{q}.gguf", *K_QUANTS),
        ),
        CatalogEntry(
            "qwen1.5-1.8b", "Qwen/Qwen1.5-1.8B-Chat", 1.8, 32768, "bf16", "qwen/Qwen1.5-1.8B-Chat",
            "Qwen/Qwen1.5-1.8B-Chat-GGUF", _gguf("qwen1_5-1_8b-chat-{q}.gguf", *K_QUANTS),
        ),
        CatalogEntry(
            "qwen1.5-7b", "Qwen/Qwen1.5-7B-Chat", 7.7, 32768, "bf16", "qwen/Qwen1.5-7B-Chat",
            "Qwen/Qwen1.5-7B-Chat-GGUF", _gguf("qwen1_5-7b-chat-{q}.gguf", *K_QUANTS),
        ),
        CatalogEntry(
            "qwen1.5-14b", "Qwen/Qwen1.5-14B-Chat", 14.2, 32768, "bf16", "qwen/Qwen1.5-14B-Chat",
            "Qwen/Qwen1.5-14B-Chat-GGUF", _gguf("qwen1_5-14b-chat-{q}.gguf", *K_QUANTS),
        ),
        CatalogEntry(
            "llama3-8b", "meta-llama/Meta-Llama-3-8B-Instruct", 8.0, 8192, "bf16",
            "LLM-Research/Meta-Llama-3-8B-Instruct", "QuantFactory/Meta-Llama-3-8B-Instruct-GGUF",
            _gguf("Meta-Llama-3-8B-Instruct.{q}.gguf", *THEBLOKE, lower=False),
        ),
        CatalogEntry(
            "llama2-7b", "meta-llama/Llama-2-7b-chat-hf", 6.7, 4096, "fp16", "modelscope/Llama-2-7b-chat-ms",
            "TheBloke/Llama-2-7B-Chat-GGUF", _gguf("llama-2-7b-chat.{q}.gguf", *THEBLOKE, lower=False),
        ),
        CatalogEntry(
            "llama2-13b", "meta-llama/Llama-2-13b-chat-hf", 13.0, 4096, "fp16",
            "modelscope/Llama-2-13b-chat-ms", "TheBloke/Llama-2-13B-chat-GGUF",
            _gguf("llama-2-13b-chat.{q}.gguf", *THEBLOKE, lower=False),
        ),
        CatalogEntry("chatglm3-6b", "THUDM/chatglm3-6b", 6.2, 8192, "fp16", "ZhipuAI/chatglm3-6b"),
        CatalogEntry("baichuan2-7b", "baichuan-inc/Baichuan2-7B-Chat", 7.5, 4096, "bf16"),
        CatalogEntry("baichuan2-13b", "baichuan-inc/Baichuan2-13B-Chat", 13.9, 4096, "bf16"),
        CatalogEntry(
            "falcon-7b", "tiiuae/falcon-7b-instruct", 7.2, 2048, "bf16", "AI-ModelScope/falcon-7b-instruct"
        ),
        CatalogEntry("yi-6b", "01-ai/Yi-6B-Chat", 6.1, 4096, "bf16", "01ai/Yi-6B-Chat"),
        CatalogEntry(
            "mistral-7b-instruct-v0.2", "mistralai/Mistral-7B-Instruct-v0.2", 7.2, 32768, "bf16",
            "AI-ModelScope/Mistral-7B-Instruct-v0.2", "TheBloke/Mistral-7B-Instruct-v0.2-GGUF",
            _gguf("mistral-7b-instruct-v0.2.{q}.gguf", *THEBLOKE, lower=False),
        ),
        CatalogEntry("gemma-2b-it", "google/gemma-2b-it", 2.5, 8192, "bf16", "AI-ModelScope/gemma-2b-it"),
        CatalogEntry("gemma-7b-it", "google/gemma-7b-it", 8.5, 8192, "bf16", "AI-ModelScope/gemma-7b-it"),
        CatalogEntry(
            "deepseek-coder-7b-instruct-v1.5", "deepseek-ai/deepseek-coder-7b-instruct-v1.5", 6.9, 4096,
            "bf16",
        ),
    ]
}
# fmt: on


def catalog_entry(name: str) -> CatalogEntry | None:
    key = name.strip().lower()
    if not key:
        return None
    return CATALOG.get(key) or next(
        (e for e in CATALOG.values() if key in (e.repo_id.lower(), e.gguf_repo.lower())), None
    )
