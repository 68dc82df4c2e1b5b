// Definitions of the compressed page format (docs/format.md) shared by the CPU
// and CUDA kernels. Every arithmetic step that decides a stored byte lives here,
// written with explicit rounding, so that both compilers produce the same bits.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
  #define KVZ_HD __host__ __device__ __forceinline__
#else
  #define KVZ_HD inline
#endif

namespace kvcompress {

constexpr uint32_t kMagic = 0x315A564Bu;  // "KVZ1"
constexpr uint8_t kVersion = 1;
constexpr int kHeaderBytes = 32;
constexpr int kHeaderChecksumWords = 7;
constexpr int kRecordAlign = 16;
constexpr int kBlockValues = 32;
constexpr int kMaxWidth = 24;
constexpr float kMaxQuant = 4194304.0f;  // 2^22

enum DtypeCode : uint8_t { kFp16 = 1, kBf16 = 2, kFp32 = 3 };
enum Mode : uint8_t { kFixed = 0, kPlain = 1, kOutlier = 2 };

enum CompressStatus : int64_t {
  kCompressed = 0,
  kRawNonFinite = 1,
  kRawBoundUnattainable = 2,
  kRawNoGain = 3,
  kBadSourceIndex = 4,
};

enum DecodeStatus : int32_t {
  kOk = 0,
  kBadIndex = 1,
  kBadRecord = 2,
  kBadMagic = 3,
  kBadChecksum = 4,
  kMismatch = 5,
  kMalformed = 6,
};

constexpr uint8_t kFlagRaw = 1u;
constexpr int kFlagReasonShift = 1;
constexpr uint8_t kFlagRelative = 1u << 3;
constexpr uint8_t kFlagReservedMask = 0xF0u;

struct PageHeader {
  uint32_t magic;
  uint8_t version;
  uint8_t dtype;
  uint8_t mode;
  uint8_t flags;
  uint32_t n;
  uint16_t rows;
  uint16_t reserved;
  float eb;
  float step;
  uint32_t payload_len;
  uint32_t checksum;
};
static_assert(sizeof(PageHeader) == kHeaderBytes, "header layout");

KVZ_HD uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// One word's term of the checksum sum; `index` counts from the first header word.
KVZ_HD uint32_t checksum_term(uint32_t word, uint32_t index) {
  return fmix32(word + (index + 1u) * 0x9E3779B9u);
}

KVZ_HD uint32_t checksum_finish(uint32_t sum, uint32_t payload_len) {
  return fmix32(sum ^ payload_len);
}

KVZ_HD uint32_t round_up(uint32_t v, uint32_t to) { return (v + to - 1) / to * to; }

KVZ_HD uint32_t zigzag(int32_t v) {
  return (static_cast<uint32_t>(v) << 1) ^ static_cast<uint32_t>(v >> 31);
}

KVZ_HD int32_t unzigzag(uint32_t z) {
  return static_cast<int32_t>((z >> 1) ^ (0u - (z & 1u)));
}

KVZ_HD int bit_length(uint32_t v) {
#ifdef __CUDA_ARCH__
  return 32 - __clz(v);
#else
  return v == 0 ? 0 : 32 - __builtin_clz(v);
#endif
}

KVZ_HD int byte_length(uint32_t v) { return (bit_length(v) + 7) / 8; }

KVZ_HD int dtype_bytes(uint8_t dtype) { return dtype == kFp32 ? 4 : 2; }

// Memory index of stream position s (docs/format.md, "stream order").
KVZ_HD uint32_t memory_index(uint32_t s, uint32_t rows, uint32_t cols) {
  return (s % rows) * cols + s / rows;
}

KVZ_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

KVZ_HD float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

KVZ_HD float round_down_f32(double v) {
#ifdef __CUDA_ARCH__
  return __double2float_rd(v);
#else
  float f = static_cast<float>(v);
  if (static_cast<double>(f) > v) f = __builtin_nextafterf(f, -__builtin_inff());
  return f;
#endif
}

KVZ_HD double dsub(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

KVZ_HD double dmul(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

KVZ_HD double dadd(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// Quantisation parameters of one page, derived from its range (steps 2-5 of
// "Choosing the page bound"). `raw_reason` is 0 when the page can be quantised.
struct PageQuant {
  float eb;
  float step;
  float inv;
  uint8_t raw_reason;
};

KVZ_HD PageQuant choose_quant(uint8_t dtype, bool relative, double eb_req, float mx, float mn,
                              bool nonfinite) {
  PageQuant pq{0.0f, 0.0f, 0.0f, 0};
  if (nonfinite) {
    pq.raw_reason = kRawNonFinite;
    return pq;
  }
  const double range = dsub(static_cast<double>(mx), static_cast<double>(mn));
  pq.eb = round_down_f32(relative ? dmul(eb_req, range) : eb_req);
  const float amax = mx > -mn ? mx : -mn;
  double u, v;
  if (dtype == kFp16) {
    u = 0x1p-11;
    v = 0x1p-25;
  } else if (dtype == kBf16) {
    u = 0x1p-8;
    v = 0.0;
  } else {
    u = 0x1p-21;
    v = 0.0;
  }
  const double eb = static_cast<double>(pq.eb);
  const double t = dsub(dsub(eb, dmul(u, dadd(static_cast<double>(amax), eb))), v);
  if (t > 0.0) {
    pq.step = 2.0f * round_down_f32(t);
  } else if (mx == mn) {
    pq.step = mx != 0.0f ? (mx > 0.0f ? mx : -mx) : 1.0f;
  } else {
    pq.raw_reason = kRawBoundUnattainable;
    return pq;
  }
  pq.inv = div_rn(1.0f, pq.step);
  return pq;
}

KVZ_HD PageHeader make_header(uint8_t dtype, uint8_t mode, bool relative, uint32_t n,
                              uint32_t rows, const PageQuant& pq, uint8_t raw_reason,
                              uint32_t payload_len) {
  PageHeader h;
  h.magic = kMagic;
  h.version = kVersion;
  h.dtype = dtype;
  h.mode = mode;
  h.flags = static_cast<uint8_t>((relative ? kFlagRelative : 0u) |
                                 (raw_reason ? (kFlagRaw | (raw_reason << kFlagReasonShift)) : 0u));
  h.n = n;
  h.rows = static_cast<uint16_t>(raw_reason ? 1u : rows);
  h.reserved = 0;
  h.eb = raw_reason ? 0.0f : pq.eb;
  h.step = raw_reason ? 0.0f : pq.step;
  h.payload_len = payload_len;
  h.checksum = 0;
  return h;
}

// Payload length of a compressed page from its section totals.
KVZ_HD uint32_t compressed_payload_len(uint32_t num_blocks, uint32_t outlier_bytes,
                                       uint32_t plane_words) {
  return round_up(num_blocks, 4) + round_up(outlier_bytes, 4) + 4u * plane_words;
}

KVZ_HD uint32_t raw_payload_len(uint32_t n, uint8_t dtype) {
  return round_up(n * static_cast<uint32_t>(dtype_bytes(dtype)), 4);
}

// Words a block with width f occupies in the planes section.
KVZ_HD uint32_t block_words(int f) { return f > 0 ? static_cast<uint32_t>(f) + 1u : 0u; }

}  // namespace kvcompress
