"""kvcompress::copy_segments: many byte ranges in one call, located by index
tensors on the device that runs the copy; out-of-range segments are refused and
reported, never partially copied. On CUDA, a pinned host buffer on either side is
reached through its device mapping (the offloading store and load paths)."""

import pytest
import torch

from vllm_kvcompress import _custom_ops as ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def reference(src: torch.Tensor, dst: torch.Tensor, so: list[int], do: list[int],
              n: list[int]) -> tuple[torch.Tensor, list[int]]:
    out = dst.clone()
    status = []
    for s, d, k in zip(so, do, n):
        ok = k >= 0 and s >= 0 and d >= 0 and s + k <= src.numel() and d + k <= dst.numel()
        status.append(0 if ok else 1)
        if ok:
            out[d:d + k] = src[s:s + k]
    return out, status


def run(src: torch.Tensor, dst: torch.Tensor, so: list[int], do: list[int], n: list[int],
        device: str) -> list[int]:
    idx = lambda v: torch.tensor(v, dtype=torch.int64, device=device)  # noqa: E731
    status = torch.empty(len(n), dtype=torch.int32, device=device)
    ops.copy_segments(src, idx(so), dst, idx(do), idx(n), status)
    if device == "cuda":
        torch.cuda.synchronize()
    return status.tolist()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(5))
def test_random_segments_match_reference(device: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(0, 256, (4096,), generator=gen, dtype=torch.uint8)
    dst = torch.zeros(4096, dtype=torch.uint8)
    # Disjoint destinations, sizes both 16-aligned (vector path) and ragged.
    n = [int(x) for x in torch.randint(0, 200, (12,), generator=gen)]
    n[::2] = [k // 16 * 16 for k in n[::2]]
    do = [300 * i + (0 if i % 2 == 0 else 3) for i in range(12)]
    so = [int(x) for x in torch.randint(0, 3800, (12,), generator=gen)]
    so[::2] = [s // 16 * 16 for s in so[::2]]
    expected, expected_status = reference(src, dst, so, do, n)
    s, d = src.to(device), dst.to(device)
    assert run(s, d, so, do, n, device) == expected_status
    assert torch.equal(d.cpu(), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_range_segments_are_refused(device: str) -> None:
    src = torch.arange(64, dtype=torch.uint8, device=device)
    dst = torch.zeros(64, dtype=torch.uint8, device=device)
    status = run(src, dst, [0, 60, -1, 0, 2**62], [0, 0, 0, 60, 0], [16, 8, 4, 8, 1], device)
    assert status == [0, 1, 1, 1, 1]
    assert torch.equal(dst[:16].cpu(), torch.arange(16, dtype=torch.uint8))
    assert (dst[16:] == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("direction", ["to_host", "from_host"])
def test_pinned_host_buffers_through_the_gpu(direction: str) -> None:
    device_buf = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, device="cuda")
    host_buf = torch.zeros(1 << 20, dtype=torch.uint8).pin_memory()
    src, dst = (device_buf, host_buf) if direction == "to_host" else (host_buf, device_buf)
    if direction == "from_host":
        host_buf.copy_(torch.randint(0, 256, (1 << 20,), dtype=torch.uint8))
    expected, _ = reference(src.cpu(), dst.cpu(), [0, 65536, 1000], [4096, 200000, 900000],
                            [65536, 16384, 333])
    assert run(src, dst, [0, 65536, 1000], [4096, 200000, 900000], [65536, 16384, 333],
               "cuda") == [0, 0, 0]
    assert torch.equal(dst.cpu(), expected)


def test_bad_arguments_raise() -> None:
    src = torch.zeros(8, dtype=torch.uint8)
    i = torch.zeros(1, dtype=torch.int64)
    status = torch.empty(1, dtype=torch.int32)
    with pytest.raises(TypeError, match="uint8"):
        ops.copy_segments(src.float(), i, src, i, i, status)
    with pytest.raises(ValueError, match="must have 1 elements"):
        ops.copy_segments(src, torch.zeros(2, dtype=torch.int64), src, i, i, status)
    with pytest.raises(TypeError, match="status must be Int"):
        ops.copy_segments(src, i, src, i, i, status.long())
