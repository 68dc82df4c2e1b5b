// Byte-range copying shared by the CUDA kernels that move records between the
// GPU staging buffers and the pinned host arena (copy_segments, pack_blocks).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace kvcompress {

// Device address of a buffer: itself on the GPU; the mapped alias of pinned host memory.
uint8_t* device_address(const at::Tensor& t);

// One thread's share of copying n bytes from s to d, where `first` and `stride`
// spread the range over all threads of the CTAs given to it; 16 bytes at a time
// when both ends and n allow it.
__device__ __forceinline__ void copy_range(const uint8_t* __restrict__ s, uint8_t* __restrict__ d,
                                           int64_t n, int64_t first, int64_t stride) {
  if (((reinterpret_cast<uintptr_t>(s) | reinterpret_cast<uintptr_t>(d) | n) & 15) == 0) {
    const uint4* s4 = reinterpret_cast<const uint4*>(s);
    uint4* d4 = reinterpret_cast<uint4*>(d);
    for (int64_t i = first; i < n / 16; i += stride) d4[i] = s4[i];
  } else {
    for (int64_t i = first; i < n; i += stride) d[i] = s[i];
  }
}

}  // namespace kvcompress
