"""Read a few architecture numbers from a GGUF file's header, without loading the model.

The header is: magic, version, tensor count, KV count, then typed key/value pairs. Keys of the
architecture (`<arch>.block_count`, ...) come before the tokenizer's large arrays in files written
by llama.cpp, so reading stops as soon as the wanted keys are found.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

MAGIC = b"GGUF"
# value type -> struct format of one scalar; 8 = string, 9 = array
SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
STRING, ARRAY = 8, 9
WANTED = (
    "context_length",
    "block_count",
    "embedding_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
)
MAX_KEYS = 4096


class GgufError(ValueError):
    """Not a GGUF file, or a header this reader does not understand."""


def read_gguf_header(path: Path) -> dict[str, object]:
    """`general.architecture`, `general.parameter_count` (if written) and the WANTED keys."""
    with path.open("rb") as f:
        if f.read(4) != MAGIC:
            raise GgufError(f"{path} is not a GGUF file")
        version, _tensors, n_kv = struct.unpack("<IQQ", f.read(20))
        if version < 2:
            raise GgufError(f"{path}: GGUF version {version} is too old")
        found: dict[str, object] = {}
        arch = None
        for _ in range(min(n_kv, MAX_KEYS)):
            key = _string(f)
            value_type = _u32(f)
            if value_type == ARRAY:
                _skip_array(f)
                continue
            value = _value(f, value_type)
            if key == "general.architecture":
                arch = str(value)
            if key in ("general.architecture", "general.parameter_count", "general.name"):
                found[key] = value
            elif arch and key.startswith(arch + "."):
                short = key[len(arch) + 1 :]
                if short in WANTED:
                    found[short] = value
            if arch and all(w in found for w in WANTED[:3]) and key.startswith("tokenizer."):
                break
        return found


def _u32(f: BinaryIO) -> int:
    value: int = struct.unpack("<I", _exact(f, 4))[0]
    return value


def _exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise GgufError("truncated GGUF header")
    return data


def _string(f: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", _exact(f, 8))
    if length > 1 << 20:
        raise GgufError("implausible string length in GGUF header")
    return _exact(f, length).decode("utf-8", errors="replace")


def _value(f: BinaryIO, value_type: int) -> object:
    if value_type == STRING:
        return _string(f)
    fmt = SCALARS.get(value_type)
    if fmt is None:
        raise GgufError(f"unknown GGUF value type {value_type}")
    return struct.unpack(fmt, _exact(f, struct.calcsize(fmt)))[0]


def _skip_array(f: BinaryIO) -> None:
    item_type = _u32(f)
    (count,) = struct.unpack("<Q", _exact(f, 8))
    if item_type == STRING:
        for _ in range(count):
            (length,) = struct.unpack("<Q", _exact(f, 8))
            f.seek(length, 1)
    elif item_type == ARRAY:
        for _ in range(count):
            _skip_array(f)
    else:
        fmt = SCALARS.get(item_type)
        if fmt is None:
            raise GgufError(f"unknown GGUF array item type {item_type}")
        f.seek(struct.calcsize(fmt) * count, 1)
