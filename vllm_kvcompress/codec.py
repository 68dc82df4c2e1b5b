"""Error-bounded compression of KV-cache pages (format: docs/format.md).

A *page* is one contiguous row of a 2-D ``(num_pages, elems_per_page)`` view of a
KV cache in fp16, bf16 or fp32; in vLLM, the K or V half of one block of one layer.
A batch may draw on several such views of one shape (each layer's cache, say):
page id ``i`` then names row ``i % num_pages`` of view ``i // num_pages``, so one
launch covers a block in every layer. A batch of pages compresses into one byte
buffer plus a page table; decompression scatters the pages back into any rows of
destination views, in place, on the current CUDA stream (or on the CPU). Every value written back is within the error
bound of the original: the encoder verifies this and stores a page raw when it
cannot promise it.
"""

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm_kvcompress import _custom_ops as ops

HEADER_BYTES = 32
RECORD_ALIGN = 16
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Views one call can take (kMaxSources in csrc/ops.h).
MAX_VIEWS = 256


class CodecMode(enum.IntEnum):
    """How each 32-value block predicts its values before bit-plane coding."""

    FIXED = 0
    """No prediction: quantised values are coded as they are."""
    PLAIN = 1
    """Each value is coded as the difference from its predecessor in the block."""
    OUTLIER = 2
    """Like PLAIN, but the block's leading value is kept apart in whole bytes so a
    large first value does not widen every bit-plane of the block."""


class CompressStatus(enum.IntEnum):
    """Per-page outcome of compression (third column of the page table)."""

    COMPRESSED = 0
    RAW_NON_FINITE = 1
    RAW_BOUND_UNATTAINABLE = 2
    RAW_NO_GAIN = 3
    BAD_SOURCE_INDEX = 4


class DecodeStatus(enum.IntEnum):
    """Per-page outcome of decompression; the page is written only on OK."""

    OK = 0
    BAD_INDEX = 1
    BAD_RECORD = 2
    BAD_MAGIC = 3
    BAD_CHECKSUM = 4
    MISMATCH = 5
    MALFORMED = 6


@dataclass(frozen=True)
class CodecConfig:
    """What the codec promises and how it codes.

    ``error_bound`` is absolute, or relative to each page's value range
    (``max - min``) when ``relative`` is true. ``rows`` views each page as a
    ``rows x (elems_per_page / rows)`` matrix coded column by column; with
    ``rows = block_size`` a KV page is coded channel by channel along tokens,
    with ``rows = 1`` in memory order (token by token along channels).
    """

    error_bound: float = 1e-2
    relative: bool = True
    mode: CodecMode = CodecMode.PLAIN
    rows: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.error_bound, (int, float)) and math.isfinite(self.error_bound)
                and self.error_bound > 0):
            raise ValueError(f"error_bound must be a finite number > 0, got {self.error_bound!r}")
        try:
            object.__setattr__(self, "mode", CodecMode(self.mode))
        except ValueError:
            names = ", ".join(m.name.lower() for m in CodecMode)
            raise ValueError(f"mode must be one of {names}, got {self.mode!r}") from None
        if not 1 <= self.rows <= 65535:
            raise ValueError(f"rows must be in [1, 65535], got {self.rows}")


@dataclass
class CompressedPages:
    """A batch of compressed pages: records in ``buffer``, located by ``table``.

    ``table[i] = (offset, nbytes, status)`` for the i-th page of the batch. The
    used length of ``buffer`` is ``table[-1, 0] + table[-1, 1]``; it stays on the
    device until someone asks (see :meth:`used_bytes`).
    """

    buffer: torch.Tensor
    table: torch.Tensor

    def used_bytes(self) -> int:
        """Bytes of ``buffer`` the records occupy (synchronises with the device)."""
        if self.table.shape[0] == 0:
            return 0
        last = self.table[-1, :2].tolist()
        return int(last[0] + last[1])


def record_bound(elems_per_page: int, dtype: torch.dtype) -> int:
    """Largest record one page can produce: a header plus the raw page."""
    raw = -(-elems_per_page * dtype.itemsize // 4) * 4
    return -(-(HEADER_BYTES + raw) // RECORD_ALIGN) * RECORD_ALIGN


def compress_bound(num_pages: int, elems_per_page: int, dtype: torch.dtype) -> int:
    """Buffer size that always holds ``num_pages`` compressed pages."""
    return num_pages * record_bound(elems_per_page, dtype)


def compress_pages(
    pages: torch.Tensor | Sequence[torch.Tensor],
    page_ids: torch.Tensor,
    config: CodecConfig,
    out: torch.Tensor | None = None,
) -> CompressedPages:
    """Compresses pages ``page_ids`` of ``pages`` (one view, or views of one shape
    addressed one after another) into one buffer.

    ``out`` may be a preallocated uint8 staging buffer of at least
    :func:`compress_bound` bytes; otherwise one is allocated on ``pages``' device.
    On CUDA this is one kernel launch on the current stream, with no host sync.
    """
    views = _as_views(pages, "pages")
    first = views[0]
    page_ids = _as_index_tensor(page_ids, first.device)
    num = page_ids.numel()
    if out is None:
        out = torch.empty(compress_bound(num, first.shape[1], first.dtype),
                          dtype=torch.uint8, device=first.device)
    table = torch.empty((num, 3), dtype=torch.int64, device=first.device)
    ops.compress(views, page_ids, float(config.error_bound), config.relative,
                 int(config.mode), config.rows, out, table)
    return CompressedPages(buffer=out, table=table)


def decompress_pages(
    compressed: CompressedPages,
    dst: torch.Tensor | Sequence[torch.Tensor],
    dst_page_ids: torch.Tensor,
) -> torch.Tensor:
    """Decodes each record into page ``dst_page_ids[i]`` of ``dst`` (one view, or
    views of one shape addressed one after another), in place.

    Returns the per-page :class:`DecodeStatus` codes (int32, on ``dst``'s
    device). A page whose record is damaged, truncated or of another dtype or
    size is left untouched and reported; the caller must recompute it.
    """
    views = _as_views(dst, "dst")
    dst_page_ids = _as_index_tensor(dst_page_ids, views[0].device)
    status = torch.empty(dst_page_ids.numel(), dtype=torch.int32, device=views[0].device)
    ops.decompress(compressed.buffer, compressed.table, views, dst_page_ids, status)
    return status


def _as_views(pages: torch.Tensor | Sequence[torch.Tensor], name: str) -> list[torch.Tensor]:
    views = [pages] if isinstance(pages, torch.Tensor) else list(pages)
    if not 1 <= len(views) <= MAX_VIEWS:
        raise ValueError(f"{name} must be 1 to {MAX_VIEWS} page views, got {len(views)}")
    for view in views:
        _check_pages(view, name)
    return views


def _check_pages(pages: torch.Tensor, name: str) -> None:
    if not isinstance(pages, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(pages).__name__}")
    if pages.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {pages.dtype}")
    if pages.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (num_pages, elems_per_page) view, "
                         f"got shape {tuple(pages.shape)}")


def _as_index_tensor(ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    ids = torch.as_tensor(ids)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"page ids must be integers, got {ids.dtype}")
    return ids.to(device=device, dtype=torch.int64).contiguous().reshape(-1)
