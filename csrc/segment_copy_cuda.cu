// CUDA kernel of kvcompress::copy_segments: copies many variable-size byte ranges
// whose offsets and sizes live in device memory. The store path uses it to write
// just the compressed records from the GPU staging buffer into the pinned host
// arena (mapped memory, written over PCIe by the SMs), so the record sizes that
// the compressor produced never need a device-to-host round trip first.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ops.h"
#include "segment_copy.cuh"

namespace kvcompress {
namespace {

constexpr int kThreads = 256;
// CTAs per segment: enough 16-byte accesses in flight to cover PCIe latency for
// segments of tens of kilobytes without launching idle CTAs for small ones.
constexpr int kCtasPerSegment = 4;

__global__ void __launch_bounds__(kThreads)
    copy_segments_kernel(const uint8_t* __restrict__ src, int64_t src_len,
                         uint8_t* __restrict__ dst, int64_t dst_len,
                         const int64_t* __restrict__ src_offsets,
                         const int64_t* __restrict__ dst_offsets,
                         const int64_t* __restrict__ sizes, int32_t* __restrict__ status) {
  const int64_t seg = blockIdx.x;
  const int64_t so = src_offsets[seg];
  const int64_t dof = dst_offsets[seg];
  const int64_t n = sizes[seg];
  const bool ok = segment_in_bounds(so, dof, n, src_len, dst_len);
  if (blockIdx.y == 0 && threadIdx.x == 0) status[seg] = ok ? kSegmentOk : kSegmentOutOfBounds;
  if (!ok) return;
  copy_range(src + so, dst + dof, n, static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x,
             static_cast<int64_t>(gridDim.y) * kThreads);
}

}  // namespace

uint8_t* device_address(const at::Tensor& t) {
  uint8_t* p = static_cast<uint8_t*>(t.data_ptr());
  if (t.is_cuda()) return p;
  void* mapped = nullptr;
  C10_CUDA_CHECK(cudaHostGetDevicePointer(&mapped, p, 0));
  return static_cast<uint8_t*>(mapped);
}

void copy_segments_cuda(const at::Tensor& src, const at::Tensor& src_offsets, at::Tensor& dst,
                        const at::Tensor& dst_offsets, const at::Tensor& sizes,
                        at::Tensor& status) {
  const c10::cuda::CUDAGuard guard(sizes.device());
  const int64_t num = sizes.numel();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(num), kCtasPerSegment);
  copy_segments_kernel<<<grid, kThreads, 0, stream>>>(
      device_address(src), src.numel(), device_address(dst), dst.numel(),
      src_offsets.data_ptr<int64_t>(), dst_offsets.data_ptr<int64_t>(),
      sizes.data_ptr<int64_t>(), status.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace kvcompress
