// CUDA kernel of kvcompress::pack_blocks (pack_blocks.cpp says what it is for).
// One block of records per grid row: its first warp sums the record sizes and
// header checksums from the codec's page table, then the row's CTAs copy the
// records, as copy_segments does, into the destination: GPU staging slots, or the
// pinned host arena through its device mapping.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ops.h"
#include "segment_copy.cuh"

namespace kvcompress {
namespace {

constexpr int kThreads = 256;
// CTAs per block of records: enough 16-byte accesses in flight to cover PCIe
// latency for a few hundred kilobytes without idle CTAs.
constexpr int kCtasPerBlock = 4;

struct PackArgs {
  const uint8_t* src;
  int64_t src_len;
  const int64_t* table;
  int64_t pages;
  const int64_t* room;
  uint8_t* dst;
  int64_t dst_len;
  const int64_t* dst_offsets;
  int32_t* status;
  int64_t* checksums;
};

__global__ void __launch_bounds__(kThreads) pack_blocks_kernel(PackArgs a) {
  const int64_t b = blockIdx.x;
  const int64_t* rows = a.table + b * a.pages * 3;
  __shared__ int64_t block_len;
  if (threadIdx.x < 32) {
    int64_t len = 0, sum = 0;
    for (int64_t p = threadIdx.x; p < a.pages; p += 32) {
      len = add_record_bytes(len, rows[3 * p + 1], a.src_len + 1);
      if (blockIdx.y == 0) sum += header_checksum_at(a.src, a.src_len, rows[3 * p]);
    }
    for (int o = 16; o > 0; o >>= 1) {
      len = add_record_bytes(len, __shfl_xor_sync(0xFFFFFFFFu, len, o), a.src_len + 1);
      sum += __shfl_xor_sync(0xFFFFFFFFu, sum, o);
    }
    if (threadIdx.x == 0) {
      block_len = len;
      if (blockIdx.y == 0) a.checksums[b] = sum;
    }
  }
  __syncthreads();
  const int64_t n = min(block_len, a.room[b]);
  const int64_t so = rows[0];
  const int64_t dof = a.dst_offsets[b];
  const bool ok = segment_in_bounds(so, dof, n, a.src_len, a.dst_len);
  if (blockIdx.y == 0 && threadIdx.x == 0) a.status[b] = ok ? kSegmentOk : kSegmentOutOfBounds;
  if (!ok) return;
  copy_range(a.src + so, a.dst + dof, n, static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x,
             static_cast<int64_t>(gridDim.y) * kThreads);
}

}  // namespace

void pack_blocks_cuda(const at::Tensor& records, const at::Tensor& page_table,
                      const at::Tensor& room, at::Tensor& dst, const at::Tensor& dst_offsets,
                      at::Tensor& status, at::Tensor& checksums) {
  const c10::cuda::CUDAGuard guard(records.device());
  PackArgs args;
  args.src = records.data_ptr<uint8_t>();
  args.src_len = records.numel();
  args.table = page_table.data_ptr<int64_t>();
  args.pages = page_table.size(1);
  args.room = room.data_ptr<int64_t>();
  args.dst = device_address(dst);
  args.dst_len = dst.numel();
  args.dst_offsets = dst_offsets.data_ptr<int64_t>();
  args.status = status.data_ptr<int32_t>();
  args.checksums = checksums.data_ptr<int64_t>();
  const dim3 grid(static_cast<unsigned>(page_table.size(0)), kCtasPerBlock);
  pack_blocks_kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace kvcompress
