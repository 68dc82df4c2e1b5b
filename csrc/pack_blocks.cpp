// CPU kernel of kvcompress::pack_blocks. A store compresses a chunk of KV blocks
// into one staging buffer, where each block's records lie together; this moves
// each block's records to its destination (staging slots laid out like the arena,
// or the arena itself), cut at the bytes the block may take, and sums the checksums
// of its record headers for the block table. On CUDA the same op runs on the
// device (pack_blocks_cuda.cu), so one launch replaces a handful of tensor ops per
// chunk in the engine's step.
#include <algorithm>
#include <cstring>

#include "ops.h"

namespace kvcompress {

void pack_blocks_cpu(const at::Tensor& records, const at::Tensor& page_table,
                     const at::Tensor& room, at::Tensor& dst, const at::Tensor& dst_offsets,
                     at::Tensor& status, at::Tensor& checksums) {
  const uint8_t* src = records.data_ptr<uint8_t>();
  const int64_t src_len = records.numel();
  uint8_t* d = dst.data_ptr<uint8_t>();
  const int64_t* rows = page_table.data_ptr<int64_t>();
  const int64_t blocks = page_table.size(0);
  const int64_t pages = page_table.size(1);
  const int64_t* limit = room.data_ptr<int64_t>();
  const int64_t* dof = dst_offsets.data_ptr<int64_t>();
  int32_t* st = status.data_ptr<int32_t>();
  int64_t* sums = checksums.data_ptr<int64_t>();
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t* block = rows + b * pages * 3;
    int64_t len = 0, sum = 0;
    for (int64_t p = 0; p < pages; ++p) {
      len = add_record_bytes(len, block[3 * p + 1], src_len + 1);
      sum += header_checksum_at(src, src_len, block[3 * p]);
    }
    const int64_t n = std::min(len, limit[b]);
    const bool ok = segment_in_bounds(block[0], dof[b], n, src_len, dst.numel());
    st[b] = ok ? kSegmentOk : kSegmentOutOfBounds;
    sums[b] = sum;
    if (ok && n > 0) std::memcpy(d + dof[b], src + block[0], static_cast<size_t>(n));
  }
}

}  // namespace kvcompress
