"""A validating, read-one-tensor-at-a-time safetensors reader.

Why not `safetensors.safe_open`: it memory-maps the file, so every tensor read stays resident
as page cache mapped into this process and the resident set grows with the checkpoint — the
opposite of streaming a 3.2 TB model. Here the header is parsed and checked once (dtypes,
shapes against byte ranges, ranges inside the file, no overlaps), and each tensor is read with
one `pread` into a fresh buffer that is freed with the tensor. A truncated or corrupt file is
reported when it is opened, before any tensor is handed out.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import QmoeError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,  # block-fp8 checkpoints' weights (`fp8.py`); never a compressed file's
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


class SafetensorsFile:
    """One open `.safetensors` file; `read(name)` returns a new CPU tensor."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise QmoeError(f"{path}: cannot open ({exc.strerror})") from None
        try:
            self.metadata, self.entries = self._parse_header()
        except BaseException:
            self.close()
            raise

    def _fail(self, what: str) -> QmoeError:
        return QmoeError(f"{self.path}: {what}; the file is corrupt or truncated, download it again")

    def _parse_header(self) -> tuple[dict[str, str], dict[str, TensorEntry]]:
        size = os.fstat(self._fd).st_size
        prefix = os.pread(self._fd, 8, 0)
        if len(prefix) < 8:
            raise self._fail(f"only {size} bytes, too short for a safetensors header")
        header_len = int.from_bytes(prefix, "little")
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise self._fail(f"header length {header_len} does not fit in the file's {size} bytes")
        try:
            header = json.loads(os.pread(self._fd, header_len, 8))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise self._fail("header is not valid JSON") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        data_start = 8 + header_len
        metadata = header.pop("__metadata__", None) or {}
        entries: dict[str, TensorEntry] = {}
        for name, info in header.items():
            entries[name] = self._check_entry(name, info, data_start, size)
        spans = sorted((e.begin, e.end, n) for n, e in entries.items())
        for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:]):
            if begin_b < end_a:
                raise self._fail(f"tensors '{name_a}' and '{name_b}' overlap")
        return metadata, entries

    def _check_entry(self, name: str, info: object, data_start: int, size: int) -> TensorEntry:
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise self._fail(f"tensor '{name}' has a malformed header entry")
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise self._fail(f"tensor '{name}' has unsupported dtype {info['dtype']!r}")
        shape, offsets = info["shape"], info["data_offsets"]
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and o >= 0 for o in offsets)):
            raise self._fail(f"tensor '{name}' has a malformed shape or data_offsets")
        begin, end = data_start + offsets[0], data_start + offsets[1]
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != expected:
            raise self._fail(f"tensor '{name}' spans {end - begin} bytes but {info['dtype']}{shape} needs {expected}")
        if end > size:
            raise self._fail(f"tensor '{name}' ends at byte {end} but the file has {size} bytes")
        return TensorEntry(dtype, tuple(shape), begin, end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name].dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def read(self, name: str, row: int | None = None) -> torch.Tensor:
        """Tensor `name`, or only its `row` along the first dim (one contiguous range: a fused
        tensor's expert j without the other experts' bytes)."""
        entry = self.entries[name]
        begin, end, shape = entry.begin, entry.end, entry.shape
        if row is not None:
            if not shape or not 0 <= row < shape[0]:
                raise QmoeError(f"{self.path}: tensor '{name}' {list(shape)} has no row {row}")
            size = (end - begin) // shape[0]
            begin, end, shape = begin + row * size, begin + (row + 1) * size, shape[1:]
        buffer = bytearray(end - begin)
        view = memoryview(buffer)
        done = 0
        while done < len(buffer):  # pread may return less than asked for large reads
            chunk = os.preadv(self._fd, [view[done:]], begin + done)
            if chunk == 0:
                raise self._fail(f"tensor '{name}' could not be read completely")
            done += chunk
        if not buffer:
            return torch.empty(shape, dtype=entry.dtype)
        return torch.frombuffer(buffer, dtype=entry.dtype).reshape(shape)

    def close(self, _close=os.close) -> None:  # bound now: at interpreter exit `os` may already be None
        if self._fd >= 0:
            _close(self._fd)
            self._fd = -1

    def __del__(self) -> None:  # file descriptors are bounded; never leak one
        if getattr(self, "_fd", -1) >= 0:
            self.close()
