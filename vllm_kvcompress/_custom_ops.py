"""Loads the compiled ops (torch.ops.kvcompress.*) and gives them fake kernels.

The ops only write into tensors the caller allocated, so their fake (meta)
implementations have nothing to compute; registering them lets the ops appear
inside torch.compile'd graphs.
"""

import torch

import vllm_kvcompress._C  # noqa: F401  (registers torch.ops.kvcompress)


@torch.library.register_fake("kvcompress::compress")
def _compress_fake(
    src: list[torch.Tensor],
    page_ids: torch.Tensor,
    eb: float,
    relative: bool,
    codec_mode: int,
    rows: int,
    out: torch.Tensor,
    page_table: torch.Tensor,
) -> None:
    return None


@torch.library.register_fake("kvcompress::decompress")
def _decompress_fake(
    buf: torch.Tensor,
    page_table: torch.Tensor,
    dst: list[torch.Tensor],
    dst_page_ids: torch.Tensor,
    status: torch.Tensor,
) -> None:
    return None


@torch.library.register_fake("kvcompress::copy_segments")
def _copy_segments_fake(
    src: torch.Tensor,
    src_offsets: torch.Tensor,
    dst: torch.Tensor,
    dst_offsets: torch.Tensor,
    sizes: torch.Tensor,
    status: torch.Tensor,
) -> None:
    return None


@torch.library.register_fake("kvcompress::pack_blocks")
def _pack_blocks_fake(
    records: torch.Tensor,
    page_table: torch.Tensor,
    room: torch.Tensor,
    dst: torch.Tensor,
    dst_offsets: torch.Tensor,
    status: torch.Tensor,
    checksums: torch.Tensor,
) -> None:
    return None


compress = torch.ops.kvcompress.compress
decompress = torch.ops.kvcompress.decompress
copy_segments = torch.ops.kvcompress.copy_segments
pack_blocks = torch.ops.kvcompress.pack_blocks
