// CPU implementation of the page codec. It follows docs/format.md step by step and
// is the implementation CI exercises; the CUDA kernels must match it byte for byte.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "codec_common.h"
#include "ops.h"

namespace kvcompress {
namespace {

template <uint8_t Code>
struct CpuType;
template <>
struct CpuType<kFp16> {
  using type = c10::Half;
};
template <>
struct CpuType<kBf16> {
  using type = c10::BFloat16;
};
template <>
struct CpuType<kFp32> {
  using type = float;
};

template <typename T>
struct DtypeTraits;
template <>
struct DtypeTraits<c10::Half> {
  static constexpr uint8_t code = kFp16;
};
template <>
struct DtypeTraits<c10::BFloat16> {
  static constexpr uint8_t code = kBf16;
};
template <>
struct DtypeTraits<float> {
  static constexpr uint8_t code = kFp32;
};

// c10's constructors from float round to nearest even, like the CUDA intrinsics.
template <typename T>
float reconstruct(int32_t q, float step) {
  return static_cast<float>(static_cast<T>(mul_rn(static_cast<float>(q), step)));
}

void append_word(std::vector<uint8_t>& bytes, uint32_t w) {
  const size_t at = bytes.size();
  bytes.resize(at + 4);
  std::memcpy(bytes.data() + at, &w, 4);
}

void pad_to(std::vector<uint8_t>& bytes, size_t multiple) {
  bytes.resize(round_up(static_cast<uint32_t>(bytes.size()), static_cast<uint32_t>(multiple)), 0);
}

uint32_t record_checksum(const PageHeader& h, const uint8_t* payload) {
  uint32_t words[kHeaderChecksumWords];
  std::memcpy(words, &h, sizeof(words));
  uint32_t sum = 0;
  for (uint32_t i = 0; i < kHeaderChecksumWords; ++i) sum += checksum_term(words[i], i);
  for (uint32_t i = 0; i < h.payload_len / 4; ++i) {
    uint32_t w;
    std::memcpy(&w, payload + 4 * i, 4);
    sum += checksum_term(w, kHeaderChecksumWords + i);
  }
  return checksum_finish(sum, h.payload_len);
}

// Encodes one page into `record` (header, payload, padding); returns its status.
template <typename T>
int64_t encode_page(const T* page, uint32_t n, uint8_t mode, double eb_req, bool relative,
                    uint32_t rows, std::vector<uint8_t>& record) {
  float mx = -INFINITY, mn = INFINITY;
  bool nonfinite = false;
  for (uint32_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(page[i]);
    nonfinite |= !std::isfinite(v);
    mx = std::fmax(mx, v);
    mn = std::fmin(mn, v);
  }
  const PageQuant pq = choose_quant(DtypeTraits<T>::code, relative, eb_req, mx, mn, nonfinite);
  uint8_t reason = pq.raw_reason;

  const uint32_t cols = n / rows;
  std::vector<int32_t> q(n);
  for (uint32_t s = 0; s < n && reason == 0; ++s) {
    const float x = static_cast<float>(page[memory_index(s, rows, cols)]);
    const float p = mul_rn(x, pq.inv);
    if (!(std::fabs(p) <= kMaxQuant)) {
      reason = kRawBoundUnattainable;
      break;
    }
    q[s] = static_cast<int32_t>(std::nearbyint(p));
    const float y = reconstruct<T>(q[s], pq.step);
    if (!(std::fabs(static_cast<double>(x) - static_cast<double>(y)) <= static_cast<double>(pq.eb))) {
      reason = kRawBoundUnattainable;
    }
  }

  std::vector<uint8_t> payload;
  if (reason == 0) {
    const uint32_t num_blocks = (n + kBlockValues - 1) / kBlockValues;
    std::vector<uint8_t> outliers;
    std::vector<uint32_t> planes;
    payload.resize(num_blocks);
    for (uint32_t j = 0; j < num_blocks; ++j) {
      int32_t d[kBlockValues];
      uint32_t any = 0;
      for (int i = 0; i < kBlockValues; ++i) {
        const uint32_t s = j * kBlockValues + i;
        if (s >= n) {
          d[i] = 0;
        } else if (i == 0) {
          d[i] = mode == kOutlier ? 0 : q[s];
        } else {
          d[i] = mode == kFixed ? q[s] : q[s] - q[s - 1];
        }
        any |= static_cast<uint32_t>(std::abs(d[i]));
      }
      const int f = bit_length(any);
      int k = 0;
      if (mode == kOutlier) {
        const uint32_t z = zigzag(q[j * kBlockValues]);
        k = byte_length(z);
        for (int b = 0; b < k; ++b) outliers.push_back(static_cast<uint8_t>(z >> (8 * b)));
      }
      payload[j] = static_cast<uint8_t>(f | (k << 5));
      if (f == 0) continue;
      uint32_t sign = 0;
      for (int i = 0; i < kBlockValues; ++i) sign |= static_cast<uint32_t>(d[i] < 0) << i;
      planes.push_back(sign);
      for (int b = 0; b < f; ++b) {
        uint32_t word = 0;
        for (int i = 0; i < kBlockValues; ++i) {
          word |= ((static_cast<uint32_t>(std::abs(d[i])) >> b) & 1u) << i;
        }
        planes.push_back(word);
      }
    }
    pad_to(payload, 4);
    payload.insert(payload.end(), outliers.begin(), outliers.end());
    pad_to(payload, 4);
    for (uint32_t w : planes) append_word(payload, w);
    if (payload.size() >= raw_payload_len(n, DtypeTraits<T>::code)) reason = kRawNoGain;
  }
  if (reason != 0) {
    payload.assign(reinterpret_cast<const uint8_t*>(page),
                   reinterpret_cast<const uint8_t*>(page) + n * sizeof(T));
    pad_to(payload, 4);
  }

  PageHeader h = make_header(DtypeTraits<T>::code, mode, relative, n, rows, pq, reason,
                             static_cast<uint32_t>(payload.size()));
  h.checksum = record_checksum(h, payload.data());
  record.resize(kHeaderBytes);
  std::memcpy(record.data(), &h, kHeaderBytes);
  record.insert(record.end(), payload.begin(), payload.end());
  pad_to(record, kRecordAlign);
  return reason;
}

// Decodes one record into `dst` (n values); writes nothing unless it returns kOk.
template <typename T>
int32_t decode_record(const uint8_t* buf, int64_t buf_size, int64_t offset, int64_t nbytes,
                      T* dst, uint32_t n) {
  if (offset < 0 || nbytes < kHeaderBytes || offset % kRecordAlign != 0 ||
      offset > buf_size - nbytes) {
    return kBadRecord;
  }
  const uint8_t* rec = buf + offset;
  PageHeader h;
  std::memcpy(&h, rec, kHeaderBytes);
  if (h.magic != kMagic || h.version != kVersion) return kBadMagic;
  if (h.payload_len % 4 != 0 || h.payload_len > nbytes - kHeaderBytes) return kBadRecord;
  const uint8_t* payload = rec + kHeaderBytes;
  if (record_checksum(h, payload) != h.checksum) return kBadChecksum;
  if (h.dtype != DtypeTraits<T>::code || h.n != n) return kMismatch;
  if ((h.flags & kFlagReservedMask) || h.reserved != 0) return kMalformed;

  if (h.flags & kFlagRaw) {
    if (h.payload_len != raw_payload_len(n, h.dtype)) return kMalformed;
    std::memcpy(dst, payload, n * sizeof(T));
    return kOk;
  }
  if (h.mode > kOutlier || h.rows == 0 || n % h.rows != 0 || !std::isfinite(h.step) ||
      !(h.step > 0.0f)) {
    return kMalformed;
  }
  const uint32_t num_blocks = (n + kBlockValues - 1) / kBlockValues;
  if (round_up(num_blocks, 4) > h.payload_len) return kMalformed;
  uint32_t outlier_bytes = 0, plane_words = 0;
  for (uint32_t j = 0; j < num_blocks; ++j) {
    const uint8_t wb = payload[j];
    const int f = wb & 31, k = (wb >> 5) & 3;
    if (f > kMaxWidth || (wb & 0x80) || (k > 0 && h.mode != kOutlier)) return kMalformed;
    outlier_bytes += k;
    plane_words += block_words(f);
  }
  if (compressed_payload_len(num_blocks, outlier_bytes, plane_words) != h.payload_len) {
    return kMalformed;
  }

  const uint8_t* outliers = payload + round_up(num_blocks, 4);
  const uint8_t* planes = outliers + round_up(outlier_bytes, 4);
  // Every check has passed: decoding cannot fail from here, so write in place.
  const uint32_t cols = n / h.rows;
  for (uint32_t j = 0; j < num_blocks; ++j) {
    const int f = payload[j] & 31, k = (payload[j] >> 5) & 3;
    uint32_t words[kMaxWidth + 1] = {0};
    if (f > 0) std::memcpy(words, planes, 4 * (f + 1));
    planes += 4 * block_words(f);
    uint32_t z = 0;
    for (int b = 0; b < k; ++b) z |= static_cast<uint32_t>(outliers[b]) << (8 * b);
    outliers += k;
    // Unsigned arithmetic: a forged stream with a valid checksum may overflow, never UB.
    uint32_t q = 0;
    for (int i = 0; i < kBlockValues; ++i) {
      uint32_t a = 0;
      for (int b = 0; b < f; ++b) a |= ((words[b + 1] >> i) & 1u) << b;
      const uint32_t d = ((words[0] >> i) & 1u) ? 0u - a : a;
      if (h.mode == kFixed) {
        q = d;
      } else if (i == 0) {
        q = h.mode == kOutlier ? static_cast<uint32_t>(unzigzag(z)) : d;
      } else {
        q += d;
      }
      const uint32_t s = j * kBlockValues + i;
      if (s < n) {
        dst[memory_index(s, h.rows, cols)] =
            static_cast<T>(mul_rn(static_cast<float>(static_cast<int32_t>(q)), h.step));
      }
    }
  }
  return kOk;
}

}  // namespace

void compress_cpu(at::TensorList src, const at::Tensor& page_ids, double eb, bool relative,
                  int64_t mode, int64_t rows, at::Tensor& out, at::Tensor& page_table) {
  const int64_t num = page_ids.numel();
  const int64_t per_source = src[0].size(0), stride = src[0].stride(0);
  const int64_t num_src = per_source * static_cast<int64_t>(src.size());
  const uint32_t n = static_cast<uint32_t>(src[0].size(1));
  const int64_t* ids = page_ids.data_ptr<int64_t>();
  std::vector<std::vector<uint8_t>> records(num);
  std::vector<int64_t> status(num);
  dispatch_kv_dtype(src[0].scalar_type(), [&](auto tag) {
    using scalar_t = typename CpuType<decltype(tag)::value>::type;
    std::vector<const scalar_t*> bases;
    for (const at::Tensor& t : src) bases.push_back(t.data_ptr<scalar_t>());
    at::parallel_for(0, num, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (ids[i] < 0 || ids[i] >= num_src) {
          status[i] = kBadSourceIndex;
          continue;
        }
        const scalar_t* page = bases[ids[i] / per_source] + (ids[i] % per_source) * stride;
        status[i] = encode_page<scalar_t>(page, n, static_cast<uint8_t>(mode), eb, relative,
                                          static_cast<uint32_t>(rows), records[i]);
      }
    });
  });
  int64_t* table = page_table.data_ptr<int64_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  int64_t offset = 0;
  for (int64_t i = 0; i < num; ++i) {
    const int64_t len = static_cast<int64_t>(records[i].size());
    std::memcpy(dst + offset, records[i].data(), len);
    table[3 * i] = offset;
    table[3 * i + 1] = len;
    table[3 * i + 2] = status[i];
    offset += len;
  }
}

void decompress_cpu(const at::Tensor& buf, const at::Tensor& page_table, at::TensorList dst,
                    const at::Tensor& dst_page_ids, at::Tensor& status) {
  const int64_t num = dst_page_ids.numel();
  const int64_t cols = page_table.size(1);
  const int64_t* table = page_table.data_ptr<int64_t>();
  const int64_t* ids = dst_page_ids.data_ptr<int64_t>();
  int32_t* st = status.data_ptr<int32_t>();
  const int64_t per_dest = dst[0].size(0), stride = dst[0].stride(0);
  const int64_t num_dst = per_dest * static_cast<int64_t>(dst.size());
  const uint32_t n = static_cast<uint32_t>(dst[0].size(1));
  dispatch_kv_dtype(dst[0].scalar_type(), [&](auto tag) {
    using scalar_t = typename CpuType<decltype(tag)::value>::type;
    std::vector<scalar_t*> bases;
    for (const at::Tensor& t : dst) bases.push_back(t.data_ptr<scalar_t>());
    at::parallel_for(0, num, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (ids[i] < 0 || ids[i] >= num_dst) {
          st[i] = kBadIndex;
          continue;
        }
        scalar_t* page = bases[ids[i] / per_dest] + (ids[i] % per_dest) * stride;
        st[i] = decode_record<scalar_t>(buf.data_ptr<uint8_t>(), buf.numel(), table[cols * i],
                                        table[cols * i + 1], page, n);
      }
    });
  });
}

}  // namespace kvcompress
