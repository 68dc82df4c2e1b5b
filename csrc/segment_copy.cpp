// CPU kernel of kvcompress::copy_segments. The offloading path uses it to move
// variable-size compressed records between a staging buffer and the host arena
// when the KV cache itself lives on the CPU (tests, CI); on CUDA the same op runs
// on the device (segment_copy_cuda.cu) so sizes never have to reach the host.
#include <cstring>

#include "ops.h"

namespace kvcompress {

void copy_segments_cpu(const at::Tensor& src, const at::Tensor& src_offsets, at::Tensor& dst,
                       const at::Tensor& dst_offsets, const at::Tensor& sizes,
                       at::Tensor& status) {
  const uint8_t* s = src.data_ptr<uint8_t>();
  uint8_t* d = dst.data_ptr<uint8_t>();
  const int64_t* so = src_offsets.data_ptr<int64_t>();
  const int64_t* dof = dst_offsets.data_ptr<int64_t>();
  const int64_t* n = sizes.data_ptr<int64_t>();
  int32_t* st = status.data_ptr<int32_t>();
  const int64_t num = sizes.numel();
  for (int64_t i = 0; i < num; ++i) {
    const bool ok = segment_in_bounds(so[i], dof[i], n[i], src.numel(), dst.numel());
    st[i] = ok ? kSegmentOk : kSegmentOutOfBounds;
    if (ok && n[i] > 0) std::memcpy(d + dof[i], s + so[i], static_cast<size_t>(n[i]));
  }
}

}  // namespace kvcompress
