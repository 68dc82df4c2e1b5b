// Entry points of the codec ops and the helpers both backends share.
#pragma once

#include <ATen/ATen.h>

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

void compress_cpu(const at::Tensor& src, const at::Tensor& page_ids, double eb, bool relative,
                  int64_t mode, int64_t rows, at::Tensor& out, at::Tensor& page_table);
void decompress_cpu(const at::Tensor& buf, const at::Tensor& page_table, at::Tensor& dst,
                    const at::Tensor& dst_page_ids, at::Tensor& status);

#ifdef KVCOMPRESS_WITH_CUDA
void compress_cuda(const at::Tensor& src, const at::Tensor& page_ids, double eb, bool relative,
                   int64_t mode, int64_t rows, at::Tensor& out, at::Tensor& page_table);
void decompress_cuda(const at::Tensor& buf, const at::Tensor& page_table, at::Tensor& dst,
                     const at::Tensor& dst_page_ids, at::Tensor& status);
#endif

}  // namespace kvcompress
