// Entry points of the codec ops and the helpers both backends share.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <type_traits>

#include "codec_common.h"

namespace kvcompress {

// Calls f with std::integral_constant<uint8_t, code> for the KV dtypes the codec accepts.
template <typename F>
void dispatch_kv_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kHalf:
      f(std::integral_constant<uint8_t, kFp16>{});
      break;
    case at::kBFloat16:
      f(std::integral_constant<uint8_t, kBf16>{});
      break;
    case at::kFloat:
      f(std::integral_constant<uint8_t, kFp32>{});
      break;
    default:
      TORCH_CHECK_TYPE(false, "kvcompress: KV pages must be float16, bfloat16 or float32, got ", t);
  }
}

// The codec ops take a list of page views of one shape: page id i names page
// i % P of view i / P, where P is the views' page count. One launch then covers
// a KV block's pages in every layer even when each layer is its own tensor.
constexpr int64_t kMaxSources = 256;

void compress_cpu(at::TensorList src, const at::Tensor& page_ids, double eb, bool relative,
                  int64_t mode, int64_t rows, at::Tensor& out, at::Tensor& page_table);
void decompress_cpu(const at::Tensor& buf, const at::Tensor& page_table, at::TensorList dst,
                    const at::Tensor& dst_page_ids, at::Tensor& status);

// Per-segment outcome of copy_segments.
constexpr int32_t kSegmentOk = 0;
constexpr int32_t kSegmentOutOfBounds = 1;

// A segment is copied only when it lies inside both buffers; the checks are
// written so that no addition can overflow whatever the offsets hold.
KVZ_HD bool segment_in_bounds(int64_t src_off, int64_t dst_off, int64_t n, int64_t src_len,
                              int64_t dst_len) {
  return n >= 0 && src_off >= 0 && dst_off >= 0 && src_off <= src_len && dst_off <= dst_len &&
         n <= src_len - src_off && n <= dst_len - dst_off;
}

void copy_segments_cpu(const at::Tensor& src, const at::Tensor& src_offsets, at::Tensor& dst,
                       const at::Tensor& dst_offsets, const at::Tensor& sizes,
                       at::Tensor& status);

// The checksum a record's header carries, for pack_blocks: 0 when no whole header
// lies at `offset` of the `len`-byte buffer (a page that failed has no record).
KVZ_HD uint32_t header_checksum_at(const uint8_t* buf, int64_t len, int64_t offset) {
  constexpr int64_t at = offsetof(PageHeader, checksum);
  if (offset < 0 || offset > len - kHeaderBytes) return 0;
  const uint8_t* p = buf + offset + at;
  return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 |
         static_cast<uint32_t>(p[2]) << 16 | static_cast<uint32_t>(p[3]) << 24;
}

// Running total of a block's record sizes for pack_blocks, saturating at `cap` (one
// past the records buffer): a damaged page table can hold any sizes, and a block
// that long is refused either way.
KVZ_HD int64_t add_record_bytes(int64_t total, int64_t nbytes, int64_t cap) {
  const int64_t add = nbytes < 0 ? 0 : (nbytes > cap ? cap : nbytes);
  return total > cap - add ? cap : total + add;
}

void pack_blocks_cpu(const at::Tensor& records, const at::Tensor& page_table,
                     const at::Tensor& room, at::Tensor& dst, const at::Tensor& dst_offsets,
                     at::Tensor& status, at::Tensor& checksums);

#ifdef KVCOMPRESS_WITH_CUDA
void copy_segments_cuda(const at::Tensor& src, const at::Tensor& src_offsets, at::Tensor& dst,
                        const at::Tensor& dst_offsets, const at::Tensor& sizes,
                        at::Tensor& status);
void compress_cuda(at::TensorList src, const at::Tensor& page_ids, double eb, bool relative,
                   int64_t mode, int64_t rows, at::Tensor& out, at::Tensor& page_table);
void decompress_cuda(const at::Tensor& buf, const at::Tensor& page_table, at::TensorList dst,
                     const at::Tensor& dst_page_ids, at::Tensor& status);
void pack_blocks_cuda(const at::Tensor& records, const at::Tensor& page_table,
                      const at::Tensor& room, at::Tensor& dst, const at::Tensor& dst_offsets,
                      at::Tensor& status, at::Tensor& checksums);
#endif

}  // namespace kvcompress
