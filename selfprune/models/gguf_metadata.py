"""Read a GGUF file's key-value metadata quickly (header only, no tensors).

``gguf.GGUFReader`` maps every tensor and builds one numpy view per string of the vocabulary, which takes
seconds for a 49k-token tokenizer; this reads the same keys sequentially in a fraction of that.
"""
from __future__ import annotations

import struct
from functools import lru_cache
from pathlib import Path

from gguf import GGUFValueType

_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


class _Cursor:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        size = self.take("<Q")
        text = self.data[self.pos : self.pos + size].decode("utf-8", errors="replace")
        self.pos += size
        return text

    def value(self, kind: GGUFValueType):
        if kind == GGUFValueType.STRING:
            return self.string()
        if kind == GGUFValueType.ARRAY:
            item = GGUFValueType(self.take("<I"))
            count = self.take("<Q")
            if item in _SCALARS:  # one unpack for the whole array
                fmt = _SCALARS[item]
                values = list(struct.unpack_from(f"<{count}{fmt[1]}", self.data, self.pos))
                self.pos += count * struct.calcsize(fmt)
                return values
            return [self.value(item) for _ in range(count)]
        return self.take(_SCALARS[kind])


@lru_cache(maxsize=8)
def _read(path: str, mtime_ns: int, size: int) -> dict[str, tuple]:
    with open(path, "rb") as handle:
        head = handle.read(24)
        if head[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        _, _, kv_count = struct.unpack("<IQQ", head[4:24])
        data = head
        cursor = _Cursor(data)
        cursor.pos = 24
        chunk = 1 << 20
        fields = {}
        for _ in range(kv_count):
            while True:  # read more of the header until this key-value pair parses
                try:
                    start = cursor.pos
                    key = cursor.string()
                    kind = GGUFValueType(cursor.take("<I"))
                    sub = None
                    if kind == GGUFValueType.ARRAY:
                        sub = GGUFValueType(struct.unpack_from("<I", cursor.data, cursor.pos)[0])
                    value = cursor.value(kind)
                    if cursor.pos > len(cursor.data):
                        raise struct.error("short")
                    break
                except (struct.error, IndexError):
                    more = handle.read(chunk)
                    if not more:
                        raise ValueError(f"{path}: truncated GGUF metadata") from None
                    cursor.data += more
                    cursor.pos = start
                    chunk *= 2
            fields[key] = (value, kind, sub)
    return fields


def read_metadata(path) -> dict[str, tuple]:
    """``{key: (value, GGUFValueType, array item type or None)}`` for every metadata key of a GGUF file."""
    stat = Path(path).stat()
    return _read(str(path), stat.st_mtime_ns, stat.st_size)
