// CUDA kernels of the page codec (docs/format.md); byte-identical to codec_cpu.cpp.
//
// One thread block (CTA) codes one page. The page is staged in shared memory (rows
// padded against bank conflicts, see PageGeometry), so the column-major stream
// order costs next to nothing. Compression codes each block of 32 values in one
// lane, on its own: quantisation, bound check, residuals and a bit transpose in
// registers (size_lane_blocks). Decompression of pages whose rows is 1 or 16 also
// gives each lane a block of its own where 32 consecutive blocks are narrow, and
// transposes in registers (decode_chunks); other blocks are decoded four at a time by
// a warp: lane i holds value i of each, and one warp bit-matrix transpose gives back
// the residuals of all four blocks when their widths are small. Compression finds each
// page's output offset with a single-pass decoupled look-back over the pages before
// it, so the whole batch is one launch with no host round trip.
// docs/codec-kernel-notes.md says where the instructions per value go.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cuda/atomic>
#include <algorithm>
#include <cstdlib>
#include <iterator>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>

#include "codec_common.h"
#include "ops.h"

// The kernels are built for CTAs of 2, 4 and 8 warps, each size in a translation unit
// of its own so that a parallel build compiles them at once (all three in one took 2.2
// times as long as one). Built as itself, this file holds CTAs of 8 warps and the ops
// (compress_cuda, decompress_cuda), which choose a size; codec_cuda_4warps.cu and
// codec_cuda_2warps.cu include it with KVCOMPRESS_CTA_WARPS set to theirs.
#ifndef KVCOMPRESS_CTA_WARPS
#define KVCOMPRESS_CTA_WARPS 8
#define KVCOMPRESS_CODEC_OPS
#endif

namespace kvcompress {
namespace {

// One CTA of `Warps` warps codes one page (`Warps` in the templates below: 2, 4 or 8,
// chosen per launch by automatic_cta_warps): a page of few blocks runs faster in a
// small CTA, many of them an SM, than in a large one whose warps mostly repeat the
// per-page work (docs/codec-kernel-notes.md, "CTA size per page size").
template <int Warps>
constexpr uint32_t kCtaThreads = 32 * Warps;
// Decompression decodes blocks in groups of four consecutive blocks, whose width bytes
// are one aligned word: a warp bit transpose has room for the planes of four blocks
// of width up to 7, and the width bytes move four at a time. Both kernels split a
// page's blocks between warps in whole groups (warp_blocks, warp_chunks).
constexpr int kGroupBlocks = 4;
// Decompression fetches the group it decodes next, up to a group past the last one
// (which may itself end three blocks past the last block); these width bytes read as
// zero.
constexpr int kDecodeAhead = 2 * kGroupBlocks;
constexpr unsigned kFull = 0xFFFFFFFFu;

// Dynamic shared memory of either kernel (SharedLayout): the staged page from byte 0.
extern __shared__ __align__(16) uint8_t smem[];

// The block loops address the staged page by its 32-bit shared-memory address, kept
// in the cursor: a load or store is then one instruction, where a pointer into `smem`
// makes ptxas rebuild the shared window's base around each access (four
// instructions) when registers are short. The accesses are ordered like any other
// memory access ("memory"), so barriers order them with the staging and copy-out.
__device__ __forceinline__ uint32_t staged_page_address() {
  return static_cast<uint32_t>(__cvta_generic_to_shared(smem));
}

// A 32-bit load or store of the staged page (compression's per-lane block coder: two
// half-precision values, or one fp32 value, or a plane word it keeps there).
__device__ __forceinline__ uint32_t load_shared_word(uint32_t at) {
  uint32_t w;
  asm volatile("ld.shared.b32 %0, [%1];" : "=r"(w) : "r"(at) : "memory");
  return w;
}

__device__ __forceinline__ void store_shared_word(uint32_t at, uint32_t w) {
  asm volatile("st.shared.b32 [%0], %1;" ::"r"(at), "r"(w) : "memory");
}

__device__ __forceinline__ uint32_t load_shared_byte(uint32_t at) {
  uint32_t b;
  asm volatile("ld.shared.u8 %0, [%1];" : "=r"(b) : "r"(at) : "memory");
  return b;
}

__device__ __forceinline__ void store_shared_byte(uint32_t at, uint32_t b) {
  asm volatile("st.shared.u8 [%0], %1;" ::"r"(at), "r"(b) : "memory");
}

__device__ __forceinline__ uint16_t load_shared_half(uint32_t at) {
  uint16_t h;
  asm volatile("ld.shared.b16 %0, [%1];" : "=h"(h) : "r"(at) : "memory");
  return h;
}

__device__ __forceinline__ void store_shared_half(uint32_t at, uint16_t h) {
  asm volatile("st.shared.b16 [%0], %1;" ::"r"(at), "h"(h) : "memory");
}

__device__ __forceinline__ uint4 load_shared_vec(uint32_t at) {
  uint4 v;
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(at)
               : "memory");
  return v;
}

__device__ __forceinline__ void store_shared_vec(uint32_t at, uint4 v) {
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};" ::"r"(at), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w)
               : "memory");
}

// The dtype's side of coding: staged loads and stores of single values, and, for the
// per-lane block coder, a pair of values from staged words (`pair`: pair k of a 16-byte
// chunk; `word_pair`: the values in the low and high half of one word, or of two words
// for fp32) and the dtype rounding of two reconstructions at once (`round_pair`: one
// paired conversion for the half-precision types).
template <uint8_t Code>
struct CudaType;
template <>
struct CudaType<kFp16> {
  using type = __half;
  __device__ static float to_f32(__half v) { return __half2float(v); }
  __device__ static __half from_f32(float v) { return __float2half_rn(v); }
  __device__ static float load_staged(uint32_t at) {
    return __half2float(__ushort_as_half(load_shared_half(at)));
  }
  __device__ static void store_staged(uint32_t at, float v) {
    store_shared_half(at, __half_as_ushort(__float2half_rn(v)));
  }
  __device__ static float2 word_pair(uint32_t lo, uint32_t) {
    return __half22float2(*reinterpret_cast<const __half2*>(&lo));
  }
  __device__ static float2 round_pair(float a, float b) {
    return __half22float2(__floats2half2_rn(a, b));
  }
};
template <>
struct CudaType<kBf16> {
  using type = __nv_bfloat16;
  __device__ static float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_f32(float v) { return __float2bfloat16_rn(v); }
  __device__ static float load_staged(uint32_t at) {
    return __bfloat162float(__ushort_as_bfloat16(load_shared_half(at)));
  }
  __device__ static void store_staged(uint32_t at, float v) {
    store_shared_half(at, __bfloat16_as_ushort(__float2bfloat16_rn(v)));
  }
  // A bf16 is the high half of its f32: a shift or a mask, no conversion.
  __device__ static float2 word_pair(uint32_t lo, uint32_t) {
    return make_float2(__uint_as_float(lo << 16), __uint_as_float(lo & 0xFFFF0000u));
  }
  __device__ static float2 round_pair(float a, float b) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return word_pair(*reinterpret_cast<const uint32_t*>(&h), 0);
  }
};
template <>
struct CudaType<kFp32> {
  using type = float;
  __device__ static float to_f32(float v) { return v; }
  __device__ static float from_f32(float v) { return v; }
  __device__ static float load_staged(uint32_t at) {
    float v;
    asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(at) : "memory");
    return v;
  }
  __device__ static void store_staged(uint32_t at, float v) {
    asm volatile("st.shared.f32 [%0], %1;" ::"r"(at), "f"(v) : "memory");
  }
  __device__ static float2 word_pair(uint32_t lo, uint32_t hi) {
    return make_float2(__uint_as_float(lo), __uint_as_float(hi));
  }
  __device__ static float2 round_pair(float a, float b) { return make_float2(a, b); }
};

// What one prefetch.global.L2 brings in: a 128-byte L2 line (prefetching every 32
// bytes measured the same, docs/codec-kernel-notes.md).
constexpr uint32_t kL2LineBytes = 128;

// Look-back flag: state in the top two bits, an inclusive or partial byte count below.
constexpr unsigned long long kFlagAggregate = 1ull << 62;
constexpr unsigned long long kFlagPrefix = 2ull << 62;
constexpr unsigned long long kFlagValue = (1ull << 62) - 1;

// Dynamic shared memory of one CTA: the staged page, then per-block tables.
struct SharedLayout {
  uint32_t page_bytes;  // page storage, rounded up to 16
  uint32_t num_blocks;
  __host__ __device__ uint32_t widths_at() const { return page_bytes; }
  __host__ __device__ uint32_t tables_at() const { return widths_at() + round_up(num_blocks, 16); }
  // Compression assembles the outlier section (at most 3 bytes a block) after the
  // widths; only outlier mode has one.
  __host__ __device__ uint32_t stage_at() const { return tables_at(); }
  __host__ __device__ uint32_t compress_total(bool outlier) const {
    return stage_at() + (outlier ? round_up(3 * num_blocks, 16) : 0u);
  }
  // Decompression keeps each block's outlier value (outlier mode) after the widths,
  // which have at least kDecodeAhead zero bytes after the last block: they are
  // written 16 at a time, up to widths_end().
  __host__ __device__ uint32_t widths_end() const {
    return widths_at() + round_up(num_blocks + kDecodeAhead, 16);
  }
  __host__ __device__ uint32_t outl_at() const { return widths_end(); }
  __host__ __device__ uint32_t decompress_total() const {
    return outl_at() + 4 * round_up(num_blocks, 4);
  }
};

// Division by a divisor fixed for a page, as a multiply-high and a shift: the
// run-time integer division it replaces in the stream-order index cost about as
// much as the rest of a value's coding. Exact for dividends below 2^31.
struct FastDiv {
  uint32_t d;
  uint32_t m;
  uint32_t shift;
};

__host__ __device__ inline FastDiv make_fast_div(uint32_t d) {
  FastDiv f{d, 0, 0};
  if (d > 1) {
    uint32_t l = 0;
    while ((1ull << l) < d) ++l;
    f.m = static_cast<uint32_t>(((1ull << (31 + l)) + d - 1) / d);
    f.shift = l - 1;
  }
  return f;
}

__device__ __forceinline__ uint32_t fast_div(const FastDiv& f, uint32_t x) {
  return f.d == 1 ? x : __umulhi(x, f.m) >> f.shift;
}

// Where a page lives in shared memory: its rows (memory order) `pitch` elements
// apart. The stream reads down columns when rows > 1, so one warp's 32 reads hit
// up to 32 rows; with a row length that is a multiple of 128 bytes they would all
// fall in one bank and serialise. A padded pitch of an odd number of words spreads
// them over the banks. Padding needs 16-byte aligned rows (the page is staged in
// 16-byte chunks) and is skipped for short rows, where it would cost too much space.
struct PageGeometry {
  FastDiv rows;        // stream position -> column (quotient) and row (remainder)
  FastDiv row_chunks;  // 16-byte chunk of the page -> row, when padded
  uint32_t pitch;      // elements from one row to the next in shared memory
  bool padded;
};

__host__ __device__ inline PageGeometry page_geometry(uint32_t n, uint32_t rows, int elem_bytes,
                                                      bool aligned) {
  const uint32_t cols = n / rows, row_bytes = cols * elem_bytes;
  const bool padded = aligned && rows > 1 && row_bytes % 16 == 0 && row_bytes >= 64;
  return PageGeometry{make_fast_div(rows), make_fast_div(padded ? row_bytes / 16 : 1),
                      padded ? cols + 4 / elem_bytes : cols, padded};
}

__host__ __device__ inline uint32_t staged_page_bytes(const PageGeometry& g, uint32_t n,
                                                      int elem_bytes) {
  return g.padded ? round_up(g.rows.d * g.pitch * elem_bytes, 16)
                  : round_up(n * elem_bytes, 16);
}

// Decompression learns `rows` from each page's header, so its shared memory is
// sized for the largest padded page: padding needs rows of >= 64 bytes, so it
// adds at most 4 bytes per 64.
__host__ __device__ inline uint32_t max_staged_page_bytes(uint32_t n, int elem_bytes) {
  return round_up(n * elem_bytes + n * elem_bytes / 16, 16);
}

__host__ __device__ SharedLayout shared_layout(uint32_t page_bytes, uint32_t n) {
  return SharedLayout{page_bytes, (n + kBlockValues - 1) / kBlockValues};
}

// Byte offset in shared memory of the page's 16-byte chunk k (padded pages).
__device__ __forceinline__ uint32_t staged_chunk_offset(const PageGeometry& g, uint32_t k,
                                                        int elem_bytes) {
  const uint32_t row = fast_div(g.row_chunks, k);
  return row * g.pitch * elem_bytes + (k - row * g.row_chunks.d) * 16;
}

// Walks one thread's 16-byte chunks of a padded page, k, k + T, k + 2 T (T threads),
// ..., giving each one's staged_chunk_offset with an add and a rare row wrap. Used by
// compression's staging loop (on sm_90, 106 instructions per four chunks where the
// division took 127); decompression's copy-out keeps the division, which the
// compiler spreads over four independent chunks more cheaply than this serial walk.
struct ChunkWalk {
  uint32_t at;          // byte offset of the current chunk
  uint32_t col;         // its chunk within its row
  uint32_t row_chunks;  // chunks of a row
  uint32_t step_col;    // T mod row_chunks
  uint32_t step_at;     // offset change of T chunks that stay within the row
  uint32_t wrap;        // further offset change when the column passes the row's end
  __device__ __forceinline__ void advance() {
    at += step_at;
    col += step_col;
    if (col >= row_chunks) {
      col -= row_chunks;
      at += wrap;
    }
  }
};

template <int Warps>
__device__ __forceinline__ ChunkWalk chunk_walk(const PageGeometry& g, uint32_t k,
                                                uint32_t elem_bytes) {
  constexpr uint32_t kThreads = kCtaThreads<Warps>;
  ChunkWalk w;
  w.row_chunks = g.row_chunks.d;
  const uint32_t pitch_bytes = g.pitch * elem_bytes, row = fast_div(g.row_chunks, k);
  w.col = k - row * w.row_chunks;
  w.at = row * pitch_bytes + w.col * 16;
  const uint32_t step_rows = kThreads / w.row_chunks;
  w.step_col = kThreads - step_rows * w.row_chunks;
  w.step_at = step_rows * pitch_bytes + w.step_col * 16;
  // Passing the row's end goes on to the next row and back a row of chunks (mod 2^32).
  w.wrap = pitch_bytes - w.row_chunks * 16;
  return w;
}

// Walks one lane's stream positions s, s + stride, s + 2 * stride, ... and gives the
// shared-memory index of each. Moving on costs two adds and a rare row wrap, where
// staged_index needs a multiply-high division per value.
struct StreamCursor {
  uint32_t index;       // shared-memory index of the current position
  uint32_t row;         // its row, position mod rows
  uint32_t rows;
  uint32_t step_row;    // stride mod rows
  uint32_t step_index;  // index change of a stride that stays below the last row
  uint32_t wrap;        // further index change when the row passes the last one
  // Wraps false: the caller knows step_row is 0, so the row never changes.
  template <bool Wraps = true>
  __device__ __forceinline__ void advance() {
    index += step_index;
    if constexpr (Wraps) {
      row += step_row;
      if (row >= rows) {
        row -= rows;
        index += wrap;
      }
    }
  }
};

__device__ __forceinline__ StreamCursor stream_cursor(const PageGeometry& g, uint32_t s,
                                                      uint32_t stride) {
  StreamCursor c;
  c.rows = g.rows.d;
  const uint32_t col = fast_div(g.rows, s), step_col = stride / c.rows;
  c.row = s - col * c.rows;
  c.index = c.row * g.pitch + col;
  c.step_row = stride - step_col * c.rows;
  c.step_index = c.step_row * g.pitch + step_col;
  // Passing the last row goes back rows rows and on one column (mod 2^32).
  c.wrap = 1u - c.rows * g.pitch;
  return c;
}

// The same walk as shared-memory addresses of the staged page's elements of
// `elem_bytes` (CudaType::load_staged, store_staged).
__device__ __forceinline__ StreamCursor in_shared_addresses(StreamCursor c, uint32_t elem_bytes) {
  c.index = staged_page_address() + c.index * elem_bytes;
  c.step_index *= elem_bytes;
  c.wrap *= elem_bytes;
  return c;
}

// v plus the v of the lane `delta` below, in lanes that have one. The shuffle's own
// in-range predicate guards the add: a step is the shuffle and one predicated add,
// where testing the lane index took a select and an add after the shuffle.
__device__ __forceinline__ uint32_t add_from_lane_below(uint32_t v, int delta) {
  uint32_t sum;
  asm("{\n\t.reg .b32 below;\n\t.reg .pred has_below;\n\t"
      "shfl.sync.up.b32 below|has_below, %1, %2, 0, 0xffffffff;\n\t"
      "mov.b32 %0, %1;\n\t"
      "@has_below add.u32 %0, %0, below;\n\t}"
      : "=r"(sum)
      : "r"(v), "r"(delta));
  return sum;
}

// Inclusive sums of v over the lanes.
__device__ __forceinline__ uint32_t lane_prefix_sum(uint32_t v) {
#pragma unroll
  for (int delta = 1; delta < 32; delta <<= 1) v = add_from_lane_below(v, delta);
  return v;
}

template <int Warps, typename T, typename Op>
__device__ T block_reduce(T v, T* scratch, Op op) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(kFull, v, o));
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = scratch[0];
  for (int w = 1; w < Warps; ++w) v = op(v, scratch[w]);
  return v;
}

// Copies `bytes` (a multiple of 4) between word-aligned buffers, 16 bytes at a
// time when both are 16-byte aligned.
template <int Warps>
__device__ void copy_words(uint8_t* dst, const uint8_t* src, uint32_t bytes) {
  constexpr uint32_t kThreads = kCtaThreads<Warps>;
  uint32_t done = 0;
  if (((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15) == 0) {
    done = bytes / 16 * 4;
    for (uint32_t i = threadIdx.x; i < bytes / 16; i += kThreads) {
      reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(src)[i];
    }
  }
  for (uint32_t i = done + threadIdx.x; i < bytes / 4; i += kThreads) {
    reinterpret_cast<uint32_t*>(dst)[i] = reinterpret_cast<const uint32_t*>(src)[i];
  }
}

// Copies `bytes` (a multiple of 4) between word-aligned buffers, 16 bytes at a time
// when both are 16-byte aligned, and returns this thread's checksum terms of the
// words it copied, word i of `src` at checksum index `first + i`: the words are
// hashed from the registers they are copied through, not read back from `dst`.
template <int Warps>
__device__ uint32_t copy_checksum_words(uint8_t* dst, const uint8_t* src, uint32_t bytes,
                                        uint32_t first) {
  constexpr uint32_t kThreads = kCtaThreads<Warps>;
  uint32_t sum = 0, done = 0;
  if (((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15) == 0) {
    done = bytes / 16 * 4;
    for (uint32_t i = threadIdx.x; i < bytes / 16; i += kThreads) {
      const uint4 v = reinterpret_cast<const uint4*>(src)[i];
      reinterpret_cast<uint4*>(dst)[i] = v;
      sum += checksum_term(v.x, first + 4 * i) + checksum_term(v.y, first + 4 * i + 1) +
             checksum_term(v.z, first + 4 * i + 2) + checksum_term(v.w, first + 4 * i + 3);
    }
  }
  for (uint32_t i = done + threadIdx.x; i < bytes / 4; i += kThreads) {
    const uint32_t w = reinterpret_cast<const uint32_t*>(src)[i];
    reinterpret_cast<uint32_t*>(dst)[i] = w;
    sum += checksum_term(w, first + i);
  }
  return sum;
}

// Checksum terms of the `bytes` (a multiple of 4) of shared memory at `words`, word i
// at checksum index `first + i`: the widths section, hashed where pass 1 left it
// before the record's offset is known, and copied out with copy_words after it.
template <int Warps>
__device__ uint32_t checksum_shared_words(const uint32_t* words, uint32_t bytes, uint32_t first) {
  constexpr uint32_t kThreads = kCtaThreads<Warps>;
  uint32_t sum = 0;
  for (uint32_t i = threadIdx.x; i < bytes / 4; i += kThreads) {
    sum += checksum_term(words[i], first + i);
  }
  return sum;
}

__device__ uint32_t header_checksum_sum(const PageHeader& h) {
  const uint32_t* w = reinterpret_cast<const uint32_t*>(&h);
  uint32_t sum = 0;
  for (int i = 0; i < kHeaderChecksumWords; ++i) sum += checksum_term(w[i], i);
  return sum;
}

// The page views of one call (ops.h): page id i is page i % per_view of view
// i / per_view. Passed by value in the kernel parameters (2 KiB of pointers).
template <typename Ptr>
struct PageViews {
  Ptr base[kMaxSources];
  int64_t per_view;
  int64_t count;  // pages in all views
  int64_t stride_bytes;
  __device__ Ptr page(int64_t id) const {
    return base[id / per_view] + (id % per_view) * stride_bytes;
  }
};

// Also says whether every page starts on a 16-byte boundary.
template <typename Ptr>
PageViews<Ptr> page_views(at::TensorList views, bool* aligned) {
  PageViews<Ptr> v{};
  v.per_view = views[0].size(0);
  v.count = v.per_view * static_cast<int64_t>(views.size());
  v.stride_bytes = views[0].stride(0) * views[0].element_size();
  *aligned = v.stride_bytes % 16 == 0;
  for (size_t i = 0; i < views.size(); ++i) {
    v.base[i] = static_cast<Ptr>(views[i].data_ptr());
    *aligned = *aligned && reinterpret_cast<uintptr_t>(v.base[i]) % 16 == 0;
  }
  return v;
}

struct CompressArgs {
  PageViews<const uint8_t*> src;
  const int64_t* page_ids;
  uint8_t* out;
  int64_t* table;
  unsigned long long* flags;
  unsigned int* ticket;
  uint32_t n;
  uint32_t rows;
  PageGeometry geometry;
  uint32_t page_smem_bytes;
  // CTAs of this launch that the device holds at once (prefetch_next_page).
  uint32_t resident;
  double eb;
  bool relative;
};

// The bound check of docs/format.md in f32, deciding all but genuine ties. eb is an
// f32 and rounding is monotonic, with e = f32(|x - y|) and d = |x - y| exactly:
//  * e < eb implies d < eb, so the value passes in binary64 too (e == 0 only when
//    x == y, which passes eb == 0).
//  * e > eb (also e = Inf) implies f64(d) > eb: were f64(d) <= eb < d, f64(d) would be
//    eb and d within half a binary64 ulp above eb, so e would round to eb. A NaN y
//    fails exactly as in binary64 (|p| > 2^22 and a NaN p, quant_in_range). Such a
//    value is certainly bad: the page goes RAW with no second look.
//  * e == eb (eb > 0) is a tie that binary64 decides either way: the page goes through
//    verify_exact. `tie_at` is eb, or NaN (equal to nothing) when eb is 0, where
//    e == 0 passes and anything else fails.
__device__ __forceinline__ float tie_limit(float eb) {
  return eb == 0.0f ? __int_as_float(0x7FC00000) : eb;
}

// Quantised value and residual of one lane (zero for padding), unsigned: residuals
// wrap modulo 2^32 as the format's two's complement does.
struct LaneCode {
  int32_t q;
  uint32_t d;
};

// Codes one block with the whole warp, lane i value i (compression's blocks wider
// than 7, see write_wide_block); the per-page and per-lane constants.
template <uint8_t Code, uint8_t Mode>
struct BlockCoder {
  using C = CudaType<Code>;
  PageQuant pq;
  uint32_t not_first;  // all ones except in lane 0
  uint32_t lane_end;   // blocks from here on are padding in this lane

  // Lane's value of block j, at shared address `at` (docs/format.md,
  // "Quantisation and verification" and "Residuals").
  __device__ __forceinline__ LaneCode code(uint32_t at, uint32_t j) const {
    const bool valid = j < lane_end;
    const float x = valid ? C::load_staged(at) : 0.0f;
    const int32_t q = __float2int_rn(mul_rn(x, pq.inv));
    const uint32_t u = static_cast<uint32_t>(q);
    uint32_t d = u;
    if constexpr (Mode != kFixed) {
      const uint32_t prev = __shfl_up_sync(kFull, u, 1);
      d = Mode == kPlain ? u - (prev & not_first) : (u - prev) & not_first;
    }
    return LaneCode{q, valid ? d : 0u};
  }
};

template <uint8_t Code, uint8_t Mode>
__device__ __forceinline__ BlockCoder<Code, Mode> block_coder(const PageQuant& pq, uint32_t n,
                                                              uint32_t num_blocks, int lane) {
  const uint32_t last_lanes = n - (num_blocks - 1) * kBlockValues;
  return BlockCoder<Code, Mode>{pq, lane > 0 ? kFull : 0u,
                                static_cast<uint32_t>(lane) < last_lanes ? num_blocks
                                                                        : num_blocks - 1};
}

// The larger of a and b, NaN if either is: a lane's worst e then carries a NaN
// to the check after the loop, which fails it as the per-value check would.
__device__ __forceinline__ float max_nan(float a, float b) {
  float m;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(m) : "f"(a), "f"(b));
  return m;
}

// |d| of a two's-complement residual, by the absolute-value instruction: written as a
// select, ptxas folds the negation into fixed mode's q - 0 and spends a compare, a
// subtraction and a select.
__device__ __forceinline__ uint32_t magnitude(uint32_t d) {
  uint32_t m;
  asm("abs.s32 %0, %1;" : "=r"(m) : "r"(d));
  return m;
}

// The bound check of docs/format.md exactly as written, for pages with a tie (see
// tie_limit) and no certainly bad value; true (for every thread) if some value fails it.
// It reads the source page in global memory, in memory order (the order does not
// matter to an OR): pass 1 may have replaced staged values with plane words.
template <int Warps, uint8_t Code>
__device__ bool verify_exact(const typename CudaType<Code>::type* src, uint32_t n,
                             const PageQuant& pq) {
  using C = CudaType<Code>;
  constexpr uint32_t kThreads = kCtaThreads<Warps>;
  bool bad = false;
  for (uint32_t i = threadIdx.x; i < n; i += kThreads) {
    const float x = C::to_f32(src[i]);
    const float p = mul_rn(x, pq.inv);
    if (!(fabsf(p) <= kMaxQuant)) {
      bad = true;
    } else {
      const float y = C::to_f32(C::from_f32(mul_rn(__int2float_rn(__float2int_rn(p)), pq.step)));
      bad |= !(fabs(static_cast<double>(x) - static_cast<double>(y)) <= static_cast<double>(pq.eb));
    }
  }
  return __syncthreads_or(bad);
}

// Each warp codes one contiguous run of whole groups, blocks [x, y), so it keeps its
// own running offsets in the planes and outlier sections and needs no scan across
// warps. The last run may end up to three blocks past num_blocks: those padding
// blocks have width 0 (compression writes their width bytes, the width section's
// padding). This split is even in groups: decompression's warp path, which decodes a
// group at a time.
template <int Warps>
__device__ __forceinline__ uint2 warp_blocks(uint32_t num_blocks, int warp) {
  const uint32_t groups = (num_blocks + kGroupBlocks - 1) / kGroupBlocks;
  return make_uint2(warp * groups / Warps * kGroupBlocks,
                    (warp + 1) * groups / Warps * kGroupBlocks);
}

// The warp's run when its lanes take a block each (compression, decompression's lane
// path): whole runs of 32 blocks, so that only the page's last run leaves lanes idle
// and a CTA codes a page in the fewest rounds of 32 (warp_blocks gave a 192-block
// page eight warps 24 blocks each: eight rounds where six do), clamped to the page's
// last group (the warp path's fetch ahead and decode_outliers rely on runs of whole
// groups ending at most three blocks past the last block). Warps past the last run
// get an empty one.
template <int Warps>
__device__ __forceinline__ uint2 warp_chunks(uint32_t num_blocks, int warp) {
  const uint32_t chunks = (num_blocks + 31) / 32, end = round_up(num_blocks, kGroupBlocks);
  return make_uint2(min(warp * chunks / Warps * 32, end),
                    min((warp + 1) * chunks / Warps * 32, end));
}

// Plane words of each block of a group, one a byte (block_words: f + 1, or 0 when
// f is 0), from the group's width bytes. Every width is at most kMaxWidth, so no
// byte carries into the next.
__device__ __forceinline__ uint32_t group_block_words(uint32_t width_bytes) {
  const uint32_t f = width_bytes & 0x1F1F1F1Fu;
  return f + (((f + 0x7F7F7F7Fu) & 0x80808080u) >> 7);
}

// Width masks of a group's bytes: no width above 7 (one transpose codes the four
// blocks) or, per pair of blocks, none above 15 (one transpose codes the pair).
constexpr uint32_t kWiderThan7 = 0x18181818u;
constexpr uint32_t kWiderThan15 = 0x10101010u;

// bit_length, as the bit-find instruction gives it: its index of the highest set bit
// is all ones for 0, so one add makes the length.
__device__ __forceinline__ uint32_t fast_bit_length(uint32_t v) {
  uint32_t highest;
  asm("bfind.u32 %0, %1;" : "=r"(highest) : "r"(v));
  return highest + 1u;
}

// Transposes the 32 x 32 bit matrix held by a warp, lane i holding row i: on return
// lane j holds column j, whose bit i is bit j of lane i's word. Five butterfly rounds,
// each swapping the off-diagonal k x k blocks between lanes k apart, cost the same
// for every width; one ballot per bit plane costs about six instructions a plane.
// The lane's selectors, masks and rotations are made once, outside the block loops.
struct BitTranspose {
  // Rounds k = 16 and 8 move whole bytes: one byte permutation of x and the
  // partner's y, where a rotation and a select would take two instructions.
  uint32_t bytes[2];
  uint32_t keep[3];  // columns a lane keeps in rounds k = 4, 2, 1
  uint32_t rot[3];   // left rotation that brings the partner's columns into place

  __device__ __forceinline__ uint32_t operator()(uint32_t x) const {
#pragma unroll
    for (int r = 0; r < 2; ++r) x = __byte_perm(x, __shfl_xor_sync(kFull, x, 16 >> r), bytes[r]);
#pragma unroll
    for (int r = 0; r < 3; ++r) {
      const uint32_t y = __shfl_xor_sync(kFull, x, 4 >> r);
      const uint32_t moved = __funnelshift_l(y, y, rot[r]);
      x = (x & keep[r]) | (moved & ~keep[r]);
    }
    return x;
  }
};

// Round k pairs lanes k apart. Lanes without bit k keep the columns without it and
// take the partner's other columns, k places up; lanes with bit k the other way
// round. The bits a rotation wraps round land in columns kept. In the byte rounds,
// byte i of the result is byte s_i of (x, y) (y's bytes numbered 4 to 7) for the
// selector s_3 s_2 s_1 s_0: k = 16 gives (x0 x1 y0 y1) below, (y2 y3 x2 x3) above;
// k = 8 gives (x0 y0 x2 y2) below, (y1 x1 y3 x3) above.
__device__ __forceinline__ BitTranspose bit_transpose() {
  const int lane = threadIdx.x & 31;
  constexpr uint32_t kLow[3] = {0x0F0F0F0Fu, 0x33333333u, 0x55555555u};
  BitTranspose t;
  t.bytes[0] = (lane & 16) ? 0x3276u : 0x5410u;
  t.bytes[1] = (lane & 8) ? 0x3715u : 0x6240u;
#pragma unroll
  for (int r = 0; r < 3; ++r) {
    const int k = 4 >> r;
    const bool upper = lane & k;
    t.keep[r] = upper ? ~kLow[r] : kLow[r];
    // Opaque to the compiler, which would otherwise fold the mask back into kLow and
    // spend three logic operations a round where one select of x and moved will do.
    asm("" : "+r"(t.keep[r]));
    t.rot[r] = upper ? 32 - k : k;
  }
  return t;
}

// The word lane i contributes to the transpose that codes one block alone (a width
// above 7), d its residual: the sign in bit 0, the magnitude above, so that after the
// transpose lane t holds word t of the block in the order of docs/format.md.
__device__ __forceinline__ uint32_t plane_row(uint32_t d) { return magnitude(d) << 1 | d >> 31; }

// Stores lane t's transposed word of a block (plane_row) at plane word at + t when
// the block has more than t words.
__device__ __forceinline__ void store_plane_word(uint32_t* planes, uint32_t at, uint32_t words,
                                                 uint32_t word) {
  const uint32_t t = threadIdx.x & 31;
  if (t < words) planes[at + t] = word;
}

// What the block coding reports in `check`, ORed over the page: a value certainly
// bad, a tie for verify_exact (see tie_limit), and plane words kept in the staged
// page (which then no longer holds every value of the page).
constexpr uint32_t kCheckBad = 1;
constexpr uint32_t kCheckTie = 2;
constexpr uint32_t kCheckKept = 4;

// Compression codes each block in one lane: a warp takes 32 consecutive blocks at a
// time, lane i block i, reads its 32 values, and quantises, checks, forms residuals
// and transposes them into plane words on its own, so that a block costs the warp
// about 1/32 of a lane's instructions and nothing crosses lanes but the scan of the
// blocks' word counts. How a lane finds its block's values in the staged page:
//  * kRows1: memory order, 64 (128 for fp32) contiguous bytes, read 16 at a time;
//  * kRows16: two adjacent columns of 16 rows (rows 16, the integration's choice for
//    a KV block), a row's two values in one word (two for fp32): the pitch must keep
//    the words aligned;
//  * kAnyRows: one value at a time down the stream order (StreamCursor), with the
//    padding tests; also the page's last block, when it holds padding, in the others.
enum class LaneLayout { kRows1, kRows16, kAnyRows };

__device__ __forceinline__ LaneLayout lane_layout(const PageGeometry& g, uint32_t elem_bytes) {
  if (g.rows.d == 1) return LaneLayout::kRows1;
  if (g.rows.d == 16 && g.pitch * elem_bytes % 4 == 0) return LaneLayout::kRows16;
  return LaneLayout::kAnyRows;
}

// Adding 1.5 * 2^23 to a p with |p| <= 2^22 rounds it to an integer, ties to even, as
// rint does: the sum lies in [2^23, 2^24], where f32 has a unit ulp, and the offset is
// even. There the sum's bits are its value plus a constant, so q is its bits minus
// kRoundShiftBits, a residual the difference of two values' bits, and f32(q) the sum
// minus the offset, exactly. Two full-rate adds where F2I and I2F take the conversion
// pipe. A page with |p| > 2^22 or a NaN p never reaches the block loops
// (quant_in_range).
constexpr float kRoundShift = 12582912.0f;
constexpr uint32_t kRoundShiftBits = 0x4B400000u;

// Whether |p| <= 2^22 for every value of the page (docs/format.md, "Quantisation
// and verification"), from its range alone: rounding is monotonic and symmetric and
// inv is positive (+Inf when step is 0), so the largest |p| is f32(amax * inv), amax =
// max(mx, -mn) being one of the page's |x|. A NaN p (0 * Inf) fails the test per
// value; here amax * Inf is Inf or, for an all-zero page, NaN, and fails too, so the
// outcome is the same. The block loops then keep no |p| of their own.
__device__ __forceinline__ bool quant_in_range(float mx, float mn, const PageQuant& pq) {
  return mul_rn(fmaxf(mx, -mn), pq.inv) <= kMaxQuant;
}

// The bits of two values' rounded p (kRoundShift), their e (see tie_limit) folded
// into a lane's worst e; the dtype rounding of the two reconstructions is one paired
// conversion. Keeping only the worst e gives the page the same outcome as the
// per-value tests (RAW if any value is certainly bad, else verify_exact if any ties,
// else compressed): a worst e equal to eb with no e above it means a tie, and a NaN
// anywhere stays NaN.
template <uint8_t Code>
__device__ __forceinline__ uint2 quantise_pair(float2 x, const PageQuant& pq, float& worst_e) {
  using C = CudaType<Code>;
  const float r0 = __fadd_rn(mul_rn(x.x, pq.inv), kRoundShift);
  const float r1 = __fadd_rn(mul_rn(x.y, pq.inv), kRoundShift);
  const float2 y = C::round_pair(mul_rn(__fsub_rn(r0, kRoundShift), pq.step),
                                 mul_rn(__fsub_rn(r1, kRoundShift), pq.step));
  worst_e = max_nan(worst_e, max_nan(fabsf(__fsub_rn(x.x, y.x)), fabsf(__fsub_rn(x.y, y.y))));
  return make_uint2(__float_as_uint(r0), __float_as_uint(r1));
}

// The same for one value; a padding value (valid false) leaves `worst_e` alone.
template <uint8_t Code>
__device__ __forceinline__ uint32_t quantise_one(float x, bool valid, const PageQuant& pq,
                                                 float& worst_e) {
  using C = CudaType<Code>;
  const float r = __fadd_rn(mul_rn(x, pq.inv), kRoundShift);
  const float y = C::to_f32(C::from_f32(mul_rn(__fsub_rn(r, kRoundShift), pq.step)));
  if (valid) worst_e = max_nan(worst_e, fabsf(__fsub_rn(x, y)));
  return __float_as_uint(r);
}

// Residuals of one block in stream order (docs/format.md, "Residuals") from the
// values' rounded bits: d = r - prev, prev being the previous value's bits, or
// kRoundShiftBits (q = 0) for fixed mode and a plain block's first value. Outlier
// mode starts prev at the first value's own bits (d_0 = 0).
template <uint8_t Mode>
struct ResidualChain {
  uint32_t prev = kRoundShiftBits;
  __device__ __forceinline__ void start(uint32_t r0) {
    if constexpr (Mode == kOutlier) prev = r0;
  }
  __device__ __forceinline__ uint32_t next(uint32_t r) {
    const uint32_t d = r - prev;
    if constexpr (Mode != kFixed) prev = r;
    return d;
  }
};

// One block as its lane codes it. While coding, byte i / 8 of word i % 8 holds value
// i's field |d_i| << 1 | sign (8 bits, exact while the width is at most 7), so that
// transpose_fields can make the format's words out of them: word 0 the sign word,
// word t bit t - 1 of the magnitudes.
struct LaneBlock {
  uint32_t w[8] = {};
  uint32_t mag = 0;  // OR of the magnitudes: the width
  uint32_t r0 = 0;   // the first value's rounded bits (outlier mode: its outlier)
  // Values i0 and i1, residuals d0 and d1: one three-input OR for both magnitudes.
  // A field is added into its word, one shift-and-add, where the bytes of a width
  // above 7 spill into their neighbours: those words are never used.
  __device__ __forceinline__ void put(int i0, uint32_t d0, int i1, uint32_t d1) {
    const uint32_t m0 = magnitude(d0), m1 = magnitude(d1);
    mag |= m0 | m1;
    place(i0, m0 << 1 | d0 >> 31);
    place(i1, m1 << 1 | d1 >> 31);
  }
  __device__ __forceinline__ void place(int i, uint32_t field) {
    w[i % 8] += field << (8 * (i / 8));
  }
};

// The bits of x where Mask is set, of y elsewhere: one three-input logic operation.
// Written as (x & mask) | (y & ~mask), ptxas splits it in two when it knows the
// shifted operand's low bits are zero.
template <uint32_t Mask>
__device__ __forceinline__ uint32_t select_bits(uint32_t x, uint32_t y) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xE4;" : "=r"(r) : "r"(x), "r"(y), "n"(Mask));
  return r;
}

// Exchanges bit k of each bit's position with bit k of its word's index, between
// words a (index bit k clear) and c (set): S = 2^k, Low the positions with bit k clear.
template <int S, uint32_t Low>
__device__ __forceinline__ void exchange_bits(uint32_t& a, uint32_t& c) {
  const uint32_t a_new = select_bits<Low>(a, c << S);
  c = select_bits<Low>(a >> S, c);
  a = a_new;
}

// Transposes the 8 x 8 bit matrix in each byte column of w[0..7]: bit b of byte c of
// w[r] trades places with bit r of byte c of w[b]. Three rounds of exchanges, 48
// logic operations and shifts for the 8 x 32 bits. Coding, bit b of value i's field
// sits at position 8 (i / 8) + b of word i % 8 and ends as bit i of word b (plane b);
// decoding, the same transposition takes planes back to byte c of word r holding the
// field of value 8c + r.
__device__ __forceinline__ void transpose_fields(uint32_t (&w)[8]) {
#pragma unroll
  for (int m = 0; m < 4; ++m) exchange_bits<4, 0x0F0F0F0Fu>(w[m], w[m + 4]);
#pragma unroll
  for (int m : {0, 1, 4, 5}) exchange_bits<2, 0x33333333u>(w[m], w[m + 2]);
#pragma unroll
  for (int m = 0; m < 8; m += 2) exchange_bits<1, 0x55555555u>(w[m], w[m + 1]);
}

// The block whose 32 values lie at `at` in memory order (kRows1), read 16 bytes at a
// time.
template <uint8_t Code, uint8_t Mode>
__device__ __forceinline__ LaneBlock code_rows1(uint32_t at, const PageQuant& pq,
                                                float& worst_e) {
  using C = CudaType<Code>;
  constexpr int kPerChunk = 16 / sizeof(typename C::type);
  LaneBlock b;
  ResidualChain<Mode> chain;
#pragma unroll
  for (int c = 0; c < kBlockValues / kPerChunk; ++c) {
    const uint4 v = load_shared_vec(at + 16 * c);
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int h = 0; h < kPerChunk / 2; ++h) {
      const int i = c * kPerChunk + 2 * h;
      float2 x;
      if constexpr (kPerChunk == 8) {
        x = C::word_pair(words[h], 0);
      } else {
        x = C::word_pair(words[2 * h], words[2 * h + 1]);
      }
      const uint2 r = quantise_pair<Code>(x, pq, worst_e);
      if (i == 0) {
        b.r0 = r.x;
        chain.start(r.x);
      }
      const uint32_t d0 = chain.next(r.x);
      b.put(i, d0, i + 1, chain.next(r.y));
    }
  }
  return b;
}

// The block whose values lie in two adjacent columns of 16 rows from `at`, `pitch`
// bytes from row to row (kRows16): row k holds values k and k + 16. The two halves of
// the stream are two residual chains; value 16, whose predecessor is value 15 (the
// last row's first value), is put last.
template <uint8_t Code, uint8_t Mode>
__device__ __forceinline__ LaneBlock code_rows16(uint32_t at, uint32_t pitch,
                                                 const PageQuant& pq, float& worst_e) {
  using C = CudaType<Code>;
  LaneBlock b;
  ResidualChain<Mode> low, high;
  uint32_t d0 = 0, r16 = 0;
#pragma unroll
  for (int k = 0; k < 16; ++k) {
    float2 x;
    if constexpr (sizeof(typename C::type) == 2) {
      x = C::word_pair(load_shared_word(at), 0);
    } else {
      x = C::word_pair(load_shared_word(at), load_shared_word(at + 4));
    }
    // The next row by one add, opaque: ptxas would otherwise hold the 16 row offsets
    // in registers across the block loop (sm_100 spills them).
    at += pitch;
    asm("" : "+r"(at));
    const uint2 r = quantise_pair<Code>(x, pq, worst_e);
    if (k == 0) {
      b.r0 = r.x;
      low.start(r.x);
      d0 = low.next(r.x);
      r16 = r.y;
      if constexpr (Mode != kFixed) high.prev = r.y;
    } else {
      const uint32_t d = low.next(r.x);
      b.put(k, d, k + 16, high.next(r.y));
    }
  }
  b.put(0, d0, 16, r16 - low.prev);
  return b;
}

// Block j in any stream order, one value at a time, with the padding tests (kAnyRows,
// and the page's last block when it holds padding).
template <uint8_t Code, uint8_t Mode>
__device__ __forceinline__ LaneBlock code_any_rows(const PageGeometry& g, uint32_t j, uint32_t n,
                                                   const PageQuant& pq, float& worst_e) {
  using C = CudaType<Code>;
  StreamCursor cur =
      in_shared_addresses(stream_cursor(g, j * kBlockValues, 1), sizeof(typename C::type));
  const uint32_t valid = n - j * kBlockValues;
  LaneBlock b;
  ResidualChain<Mode> chain;
  uint32_t d[2];
#pragma unroll
  for (int i = 0; i < kBlockValues; ++i, cur.advance()) {
    const bool real = static_cast<uint32_t>(i) < valid;
    const uint32_t r =
        quantise_one<Code>(real ? C::load_staged(cur.index) : 0.0f, real, pq, worst_e);
    if (i == 0) {
      b.r0 = r;
      chain.start(r);
    }
    d[i % 2] = real ? chain.next(r) : 0u;
    if (i % 2 == 1) b.put(i - 1, d[0], i, d[1]);
  }
  return b;
}

// The per-page constants of the per-lane block coding: where block j's values start
// in the staged page (kRows1, kRows16), the row pitch in bytes (kRows16), and the
// blocks coded the fast way: every block that holds no padding.
struct LaneBlocks {
  uint32_t page;         // staged page's shared address
  uint32_t pitch;        // bytes from row to row
  uint32_t full_blocks;  // blocks before this one hold no padding
  uint32_t num_blocks;
  uint32_t n;
};

template <uint8_t Code>
__device__ __forceinline__ LaneBlocks lane_blocks(const PageGeometry& g, uint32_t n,
                                                  uint32_t num_blocks) {
  const uint32_t bytes = sizeof(typename CudaType<Code>::type);
  return LaneBlocks{staged_page_address(), g.pitch * bytes,
                    n % kBlockValues == 0 ? num_blocks : num_blocks - 1, num_blocks, n};
}

// Shared address of block j's first value (kRows1, kRows16).
template <uint8_t Code, LaneLayout Layout>
__device__ __forceinline__ uint32_t lane_block_at(const LaneBlocks& lb, uint32_t j) {
  const uint32_t bytes = sizeof(typename CudaType<Code>::type);
  return lb.page + j * (Layout == LaneLayout::kRows1 ? kBlockValues : 2) * bytes;
}

template <uint8_t Code, uint8_t Mode, LaneLayout Layout>
__device__ __forceinline__ LaneBlock code_lane_block(const LaneBlocks& lb, const PageGeometry& g,
                                                     uint32_t j, const PageQuant& pq,
                                                     float& worst_e) {
  if (Layout != LaneLayout::kAnyRows && j < lb.full_blocks) {
    const uint32_t at = lane_block_at<Code, Layout>(lb, j);
    return Layout == LaneLayout::kRows1 ? code_rows1<Code, Mode>(at, pq, worst_e)
                                        : code_rows16<Code, Mode>(at, lb.pitch, pq, worst_e);
  }
  return code_any_rows<Code, Mode>(g, j, lb.n, pq, worst_e);
}

// Whether pass 1 keeps block j's plane words (and outlier) in the staged page for
// pass 2, in place of the block's own values: a block coded the fast way, with a
// width of at most 7 and something to write. Only the lane coding a block reads or
// writes its values, so no one can read a kept word as a value.
template <LaneLayout Layout>
__device__ __forceinline__ bool keeps_words(const LaneBlocks& lb, uint32_t j,
                                            uint32_t width_byte) {
  return Layout != LaneLayout::kAnyRows && j < lb.full_blocks && (width_byte & 0x18u) == 0 &&
         width_byte != 0;
}

// The kept words' slots: word t at byte 4 t of the block (kRows1) or in row t
// (kRows16); the outlier (outlier mode) in slot 8. Both layouts have at least 16 slots
// a block. A row's slot is the previous one's plus the pitch, opaque, as in
// code_rows16: ptxas would otherwise keep eight row offsets across the block loop.
template <LaneLayout Layout>
__device__ __forceinline__ uint32_t next_slot(const LaneBlocks& lb, uint32_t slot) {
  if constexpr (Layout == LaneLayout::kRows1) return slot + 4;
  slot += lb.pitch;
  asm("" : "+r"(slot));
  return slot;
}

template <uint8_t Code, uint8_t Mode, LaneLayout Layout>
__device__ __forceinline__ void keep_words(const LaneBlocks& lb, uint32_t j,
                                           const uint32_t (&w)[8], uint32_t outlier) {
  const uint32_t at = lane_block_at<Code, Layout>(lb, j);
  uint32_t slot = at;
  if constexpr (Layout == LaneLayout::kRows1) {
    store_shared_vec(at, make_uint4(w[0], w[1], w[2], w[3]));
    store_shared_vec(at + 16, make_uint4(w[4], w[5], w[6], w[7]));
    slot = at + 32;
  } else {
#pragma unroll
    for (int t = 0; t < 8; ++t, slot = next_slot<Layout>(lb, slot)) store_shared_word(slot, w[t]);
  }
  if constexpr (Mode == kOutlier) store_shared_word(slot, outlier);
}

template <uint8_t Code, uint8_t Mode, LaneLayout Layout>
__device__ __forceinline__ uint32_t kept_words(const LaneBlocks& lb, uint32_t j,
                                               uint32_t (&w)[8]) {
  const uint32_t at = lane_block_at<Code, Layout>(lb, j);
  uint32_t slot = at;
  if constexpr (Layout == LaneLayout::kRows1) {
    const uint4 lo = load_shared_vec(at), hi = load_shared_vec(at + 16);
    w[0] = lo.x, w[1] = lo.y, w[2] = lo.z, w[3] = lo.w;
    w[4] = hi.x, w[5] = hi.y, w[6] = hi.z, w[7] = hi.w;
    slot = at + 32;
  } else {
#pragma unroll
    for (int t = 0; t < 8; ++t, slot = next_slot<Layout>(lb, slot)) w[t] = load_shared_word(slot);
  }
  return Mode == kOutlier ? load_shared_word(slot) : 0u;
}

// A block's outlier (zigzag of q_0) and its byte count K (outlier mode).
__device__ __forceinline__ uint32_t block_outlier(uint32_t r0) {
  return zigzag(static_cast<int32_t>(r0 - kRoundShiftBits));
}

__device__ __forceinline__ uint32_t outlier_bytes(uint32_t z) {
  return (fast_bit_length(z) + 7) / 8;
}

// Stores the k (at most 3) low bytes of outlier z from shared address `at` on.
__device__ __forceinline__ void store_outlier(uint32_t at, uint32_t z, uint32_t k) {
#pragma unroll
  for (uint32_t i = 0; i < 3; ++i) {
    if (i < k) store_shared_byte(at + i, z >> (8 * i));
  }
}

// Pass 1 over a warp's run: each block's width byte, and the run's plane words (x)
// and outlier bytes (y); the plane words of each block that keeps_words, in the
// staged page. The run's blocks past num_blocks (at most three) get width 0. The
// page's bound is read after the loop, from shared address `eb_at`: held in a
// register across the loop, it was spilled (compress<8 warps, bf16, outlier>, sm_80).
template <uint8_t Code, uint8_t Mode, LaneLayout Layout>
__device__ __forceinline__ uint2 size_lane_blocks(const LaneBlocks& lb, const PageGeometry& g,
                                                  const PageQuant& pq, uint2 run,
                                                  uint8_t* widths, uint32_t eb_at,
                                                  uint32_t* check) {
  float worst_e = 0.0f;
  uint2 sizes = make_uint2(0, 0);
  bool kept = false;
  for (uint32_t j = run.x + (threadIdx.x & 31); j < run.y; j += 32) {
    uint32_t width_byte = 0;
    if (j < lb.num_blocks) {
      LaneBlock b = code_lane_block<Code, Mode, Layout>(lb, g, j, pq, worst_e);
      const uint32_t f = fast_bit_length(b.mag), z = block_outlier(b.r0);
      const uint32_t k = Mode == kOutlier ? outlier_bytes(z) : 0u;
      width_byte = f | k << 5;
      sizes.x += f == 0 ? 0u : f + 1;
      sizes.y += k;
      if (keeps_words<Layout>(lb, j, width_byte)) {
        transpose_fields(b.w);
        keep_words<Code, Mode, Layout>(lb, j, b.w, z);
        kept = true;
      }
    }
    widths[j] = static_cast<uint8_t>(width_byte);
  }
  sizes.x = __reduce_add_sync(kFull, sizes.x);
  sizes.y = __reduce_add_sync(kFull, sizes.y);
  const float eb = __uint_as_float(load_shared_word(eb_at));
  const bool bad = !(worst_e <= eb);
  const bool tie = worst_e == tie_limit(eb);
  *check = (bad ? kCheckBad : 0u) | (tie ? kCheckTie : 0u) | (kept ? kCheckKept : 0u);
  return sizes;
}

// Pass 2's path for a block wider than 7, whose fields do not fit the lane's bytes:
// the warp codes it together, lane i value i, with one warp transpose, from the
// values pass 1 left in place. `at` and `words` are its plane words, `out_at` and
// `k` its outlier bytes. Returns the checksum term of the lane's plane word (0 for a
// lane past the block's words), planes[0] at checksum index `first`.
template <uint8_t Code, uint8_t Mode>
__device__ __forceinline__ uint32_t write_wide_block(const BlockCoder<Code, Mode>& coder,
                                                     const PageGeometry& g, uint32_t j,
                                                     uint32_t at, uint32_t words, uint32_t out_at,
                                                     uint32_t k, uint32_t* planes,
                                                     uint32_t first, uint32_t stage_at) {
  const uint32_t lane = threadIdx.x & 31;
  const StreamCursor cur = in_shared_addresses(stream_cursor(g, j * kBlockValues + lane, 1),
                                               sizeof(typename CudaType<Code>::type));
  const LaneCode c = coder.code(cur.index, j);
  const uint32_t word = bit_transpose()(plane_row(c.d));
  store_plane_word(planes, at, words, word);
  if (Mode == kOutlier && lane == 0) store_outlier(stage_at + out_at, zigzag(c.q), k);
  return lane < words ? checksum_term(word, first + at + lane) : 0u;
}

// The checksum index of a compressed record's first plane word: the header's words,
// then the widths (B bytes) and outlier (`outliers` bytes) sections, each padded to
// whole words.
__device__ __forceinline__ uint32_t first_plane_index(uint32_t num_blocks, uint32_t outliers) {
  return kHeaderChecksumWords + (round_up(num_blocks, 4u) + round_up(outliers, 4u)) / 4;
}

// The checksum term of a block's plane word t, at checksum index `first + t`, or 0
// past the block's `words` (0 for a block with only an outlier). The term is computed
// either way and dropped by a select: the lanes of a round rarely all stop before
// word 8, so the branch per word that ptxas emits for a conditional hash only adds its
// three control instructions.
__device__ __forceinline__ uint32_t block_word_term(uint32_t w, uint32_t t, uint32_t words,
                                                    uint32_t first) {
  const uint32_t term = checksum_term(w, first + t);
  return t < words ? term : 0u;
}

__device__ __forceinline__ uint32_t checksum_block_words(const uint32_t (&w)[8], uint32_t words,
                                                         uint32_t first) {
  uint32_t sum = 0;
#pragma unroll
  for (uint32_t t = 0; t < 8; ++t) sum += block_word_term(w[t], t, words, first);
  return sum;
}

// The checksum terms of block j's kept words (keep_words' slots), hashed as they are
// loaded: four or one at a time, not all eight held at once (which spilled
// compress<fp32, plain> on sm_89).
template <uint8_t Code, LaneLayout Layout>
__device__ __forceinline__ uint32_t kept_word_terms(const LaneBlocks& lb, uint32_t j,
                                                    uint32_t words, uint32_t first) {
  const uint32_t at = lane_block_at<Code, Layout>(lb, j);
  uint32_t sum = 0;
  if constexpr (Layout == LaneLayout::kRows1) {
#pragma unroll
    for (uint32_t h = 0; h < 8; h += 4) {
      const uint4 v = load_shared_vec(at + 4 * h);
      sum += block_word_term(v.x, h, words, first) + block_word_term(v.y, h + 1, words, first) +
             block_word_term(v.z, h + 2, words, first) + block_word_term(v.w, h + 3, words, first);
    }
  } else {
    uint32_t slot = at;
#pragma unroll
    for (uint32_t t = 0; t < 8; ++t, slot = next_slot<Layout>(lb, slot)) {
      sum += block_word_term(load_shared_word(slot), t, words, first);
    }
  }
  return sum;
}

// The checksum terms of the plane words pass 1 kept (keeps_words), run before the
// record's offset is known: a word's checksum index is its place in the record, which
// the page's widths give. Each round of 32 blocks finds its blocks' first words with
// one scan over the lanes, as write_lane_blocks does, and a lane hashes its block's
// kept words from its staged slots. write_lane_blocks then stores them without
// hashing; it hashes the blocks it codes itself. `at` is the run's first plane word,
// planes[0] at checksum index `first`.
template <uint8_t Code, uint8_t Mode, LaneLayout Layout>
__device__ __forceinline__ uint32_t checksum_kept_words(const LaneBlocks& lb, uint2 run,
                                                        const uint8_t* widths, uint32_t at,
                                                        uint32_t first) {
  const uint32_t lane = threadIdx.x & 31;
  const uint32_t widths_at = static_cast<uint32_t>(__cvta_generic_to_shared(widths));
  uint32_t sum = 0;
  for (uint32_t j0 = run.x; j0 < run.y; j0 += 32) {
    const uint32_t j = j0 + lane;
    const uint32_t width_byte = j < run.y ? load_shared_byte(widths_at + j) : 0u;
    const uint32_t f = width_byte & 0x1Fu;
    const uint32_t words = f == 0 ? 0u : f + 1;
    const uint32_t upto = lane_prefix_sum(words);
    const uint32_t word_at = at + upto - words;
    at += __shfl_sync(kFull, upto, 31);
    if (keeps_words<Layout>(lb, j, width_byte)) {
      sum += kept_word_terms<Code, Layout>(lb, j, words, first + word_at);
    }
  }
  return sum;
}

// Pass 2 over a warp's run: its plane words into `planes` and outlier bytes into
// `stage`, from the run's offsets `at` in each; each round of 32 blocks finds its
// blocks' offsets with one scan over the lanes. A lane stores its block's words, kept
// by pass 1 or coded again (kAnyRows, a last block with padding); wider blocks are
// coded by the whole warp. Returns the checksum terms of the words it coded:
// checksum_kept_words hashed the kept ones. Those blocks are rare (a last block with
// padding, blocks wider than 7) or the layout is kAnyRows, so the checksum index of
// planes[0] is found again where one is hashed, from the outlier section's length at
// shared address `outliers_at`: held across the loop it spilled (sm_89).
template <uint8_t Code, uint8_t Mode, LaneLayout Layout>
__device__ __forceinline__ uint32_t write_lane_blocks(const LaneBlocks& lb,
                                                      const BlockCoder<Code, Mode>& coder,
                                                      const PageGeometry& g, uint2 run,
                                                      const uint8_t* widths, uint2 at,
                                                      uint32_t* planes, uint32_t outliers_at,
                                                      uint8_t* stage) {
  const uint32_t lane = threadIdx.x & 31;
  uint32_t sum = 0;
  // Shared addresses, held, not built again from the shared window's base every round.
  uint32_t widths_at = static_cast<uint32_t>(__cvta_generic_to_shared(widths));
  uint32_t stage_at = static_cast<uint32_t>(__cvta_generic_to_shared(stage));
  asm("" : "+r"(widths_at), "+r"(stage_at));
  for (uint32_t j0 = run.x; j0 < run.y; j0 += 32) {
    const uint32_t j = j0 + lane;
    const uint32_t width_byte = j < run.y ? load_shared_byte(widths_at + j) : 0u;
    const uint32_t f = width_byte & 0x1Fu, k = width_byte >> 5;
    const uint32_t words = f == 0 ? 0u : f + 1;
    // Word counts (at most 25 a block) below bit 16, outlier bytes above.
    const uint32_t own = words | k << 16, upto = lane_prefix_sum(own);
    const uint32_t word_at = at.x + ((upto - own) & 0xFFFFu);
    const uint32_t out_at = at.y + ((upto - own) >> 16);
    const uint32_t total = __shfl_sync(kFull, upto, 31);
    at.x += total & 0xFFFFu;
    at.y += total >> 16;
    if (width_byte != 0 && f <= 7) {
      uint32_t w[8], z;
      if (keeps_words<Layout>(lb, j, width_byte)) {
        z = kept_words<Code, Mode, Layout>(lb, j, w);
      } else {
        float unused = 0.0f;
        LaneBlock b = code_any_rows<Code, Mode>(g, j, lb.n, coder.pq, unused);
        transpose_fields(b.w);
#pragma unroll
        for (int t = 0; t < 8; ++t) w[t] = b.w[t];
        z = block_outlier(b.r0);
        const uint32_t first = first_plane_index(lb.num_blocks, load_shared_word(outliers_at));
        sum += checksum_block_words(w, words, first + word_at);
      }
      uint32_t* const out = planes + word_at;
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        if (static_cast<uint32_t>(t) < words) out[t] = w[t];
      }
      if constexpr (Mode == kOutlier) store_outlier(stage_at + out_at, z, k);
    }
    for (uint32_t wide = __ballot_sync(kFull, f > 7); wide != 0; wide &= wide - 1) {
      const int b = __ffs(wide) - 1;
      sum += write_wide_block<Code, Mode>(coder, g, j0 + b, __shfl_sync(kFull, word_at, b),
                                          __shfl_sync(kFull, words, b),
                                          __shfl_sync(kFull, out_at, b), __shfl_sync(kFull, k, b),
                                          planes,
                                          first_plane_index(lb.num_blocks,
                                                            load_shared_word(outliers_at)),
                                          stage_at);
    }
  }
  return sum;
}

// A flag carries its value and nothing else: no CTA reads memory that another wrote
// in the same launch, so flags are stored and loaded relaxed. Release and acquire
// cost a MEMBAR.ALL.GPU before each store and a CCTL.IVALL, which drops the whole L1
// of the SM, after every load of the look-back's spin (sm_90); relaxed, compression
// ran a median 3-4% faster (docs/codec-kernel-notes.md, "Relaxed look-back flags and an
// L2 prefetch during the wait").
__device__ void publish(unsigned long long* flag, unsigned long long v) {
  cuda::atomic_ref<unsigned long long, cuda::thread_scope_device> ref(*flag);
  ref.store(v, cuda::memory_order_relaxed);
}

// Publishes page `idx`'s record length as soon as it is known, before the page looks
// back: its successors can then add it and look past it while it does the work that
// needs no offset (docs/codec-kernel-notes.md, "Eighth round"). Page 0's length is
// already its inclusive prefix. One thread calls it.
__device__ void publish_length(unsigned long long* flags, uint32_t idx, uint64_t len) {
  publish(&flags[idx], (idx == 0 ? kFlagPrefix : kFlagAggregate) | len);
}

// Pulls into L2 the page that the CTA taking this one's place on the device will
// stage: pages are taken in ticket order and, through the look-back, finish in it, so
// the CTA started when this one ends takes about ticket `idx + resident`. Called by
// the warps that do not look back, while warp 0 waits for the pages before this one:
// their DRAM reads then overlap the wait instead of coming after it. `t` counts the
// calling threads from 0 to `threads`; a prefetch brings one L2 line. About +2.4% on
// compression (docs/codec-kernel-notes.md, the same section as the relaxed flags).
__device__ void prefetch_next_page(const CompressArgs& a, uint32_t idx, uint32_t bytes,
                                   uint32_t t, uint32_t threads) {
  const uint64_t next = static_cast<uint64_t>(idx) + a.resident;
  if (next >= gridDim.x) return;
  const int64_t id = a.page_ids[next];
  if (id < 0 || id >= a.src.count) return;
  const uint8_t* page = a.src.page(id);
  for (uint32_t at = t * kL2LineBytes; at < bytes; at += threads * kL2LineBytes) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(page + at));
  }
}

// Decoupled look-back by one warp, every lane of which calls it, after publish_length:
// the byte offset of page `idx`'s record, whose length is `len`; publishes the page's
// inclusive prefix. Lane k reads the flag of the (k + 1)-th page before the window's
// end, so one round of loads covers 32 predecessors. A single thread walked them one
// L2 round trip at a time: the CTAs of a wave reach their look-back together, each
// then found mostly aggregates behind it, and its whole CTA waited at the barrier
// after the look-back for a third of its life (docs/codec-kernel-notes.md,
// "Compression's look-back by a warp").
__device__ uint64_t look_back(unsigned long long* flags, uint32_t idx, uint64_t len, int lane) {
  if (idx == 0) return 0;
  uint64_t exclusive = 0;
  // Page indices are those of one launch's grid, below 2^31.
  for (int32_t end = static_cast<int32_t>(idx);; end -= 32) {
    const int32_t j = end - 1 - lane;
    unsigned long long v;
    uint32_t prefixes;
    int32_t last;  // the lane of the nearest prefix, 31 when the window holds none
    // Re-read the window until every page up to the nearest prefix has published.
    do {
      v = kFlagPrefix;  // before page 0: an empty prefix
      if (j >= 0) {
        cuda::atomic_ref<unsigned long long, cuda::thread_scope_device> ref(flags[j]);
        v = ref.load(cuda::memory_order_relaxed);
      }
      prefixes = __ballot_sync(kFull, (v & kFlagPrefix) != 0);
      last = prefixes != 0 ? __ffs(prefixes) - 1 : 31;
    } while (__any_sync(kFull, v == 0 && lane <= last));
    uint64_t part = lane <= last ? v & kFlagValue : 0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(kFull, part, o);
    exclusive += part;
    if (prefixes != 0) break;
  }
  if (lane == 0) publish(&flags[idx], kFlagPrefix | (exclusive + len));
  return exclusive;
}

// The range of the 16-byte chunks a thread stages. Half-precision values are taken
// in pairs, one min and one max instruction for two values, where converting and
// testing each value took about five; the NaN-propagating forms carry a NaN to the
// end, and a NaN or infinite bound there marks the page non-finite, with no test of
// each value. The max starts at -Inf and the min at +Inf, which that test (max below
// +Inf, min above -Inf) passes, so a thread that stages no chunk is not flagged.
__device__ __forceinline__ void broadcast(float v, __half2& pair) { pair = __float2half2_rn(v); }
__device__ __forceinline__ void broadcast(float v, __nv_bfloat162& pair) {
  pair = __float2bfloat162_rn(v);
}

template <typename Pair>
struct HalfPairRange {
  Pair hi, lo;
  __device__ HalfPairRange() {
    broadcast(-INFINITY, hi);
    broadcast(INFINITY, lo);
  }
  __device__ __forceinline__ void add(uint4 chunk) {
    const Pair* pairs = reinterpret_cast<const Pair*>(&chunk);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      hi = __hmax2_nan(hi, pairs[i]);
      lo = __hmin2_nan(lo, pairs[i]);
    }
  }
  __device__ __forceinline__ void finish(float& mx, float& mn, bool& nonfinite) const {
    const float h0 = __low2float(hi), h1 = __high2float(hi);
    const float l0 = __low2float(lo), l1 = __high2float(lo);
    nonfinite |= !(h0 < INFINITY) || !(h1 < INFINITY) || !(l0 > -INFINITY) ||
                 !(l1 > -INFINITY);
    mx = fmaxf(mx, fmaxf(h0, h1));
    mn = fminf(mn, fminf(l0, l1));
  }
};

__device__ __forceinline__ float min_nan(float a, float b) {
  float m;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(m) : "f"(a), "f"(b));
  return m;
}

struct FloatRange {
  float hi, lo;
  __device__ FloatRange() : hi(-INFINITY), lo(INFINITY) {}
  __device__ __forceinline__ void add(uint4 chunk) {
    const float* v = reinterpret_cast<const float*>(&chunk);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      hi = max_nan(hi, v[i]);
      lo = min_nan(lo, v[i]);
    }
  }
  __device__ __forceinline__ void finish(float& mx, float& mn, bool& nonfinite) const {
    nonfinite |= !(hi < INFINITY) || !(lo > -INFINITY);
    mx = fmaxf(mx, hi);
    mn = fminf(mn, lo);
  }
};

// Whether compression stages a page 16 bytes at a time (its raw payload is then the
// source page itself, with no padding).
__device__ __forceinline__ bool staged_by_chunks(const uint8_t* src, uint32_t page_bytes) {
  return (reinterpret_cast<uintptr_t>(src) & 15) == 0 && page_bytes % 16 == 0;
}

template <uint8_t Code>
using ChunkRange = std::conditional_t<
    Code == kFp32, FloatRange,
    HalfPairRange<std::conditional_t<Code == kFp16, __half2, __nv_bfloat162>>>;

// 40 warps an SM (5 CTAs of 8 warps, as many as shared memory allows for 32 KiB pages,
// 10 of 4, 20 of 2), 48 registers a thread; unbounded, ptxas took 56 registers (8 warps:
// four CTAs).
template <int Warps, uint8_t Code, uint8_t Mode>
__global__ void __launch_bounds__(kCtaThreads<Warps>, 40 / Warps) compress_kernel(CompressArgs a) {
  using C = CudaType<Code>;
  using T = typename C::type;
  constexpr uint32_t kThreads = kCtaThreads<Warps>;
  __shared__ uint32_t scratch[Warps];
  __shared__ uint2 warp_sizes[Warps];  // plane words and outlier bytes of each warp's blocks
  __shared__ uint32_t warp_check[Warps];  // each warp's bound checks (size_lane_blocks)
  __shared__ uint32_t warp_early_sum[Warps];  // each warp's checksum terms before the wait
  __shared__ uint32_t page_index;
  __shared__ PageQuant pq_s;
  __shared__ uint64_t offset_s;
  __shared__ uint32_t payload_len_s;
  __shared__ uint32_t outlier_total_s;
  __shared__ uint8_t reason_s;
  // The source page, read again only by verify_exact and by RAW pages whose staged
  // copy is padded or holds kept plane words: kept here, not in a register held
  // across both coding passes.
  __shared__ const uint8_t* src_s;

  const SharedLayout L = shared_layout(a.page_smem_bytes, a.n);
  const PageGeometry g = a.geometry;
  T* page = reinterpret_cast<T*>(smem);
  uint8_t* widths = smem + L.widths_at();
  uint8_t* stage = smem + L.stage_at();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint32_t B = L.num_blocks, page_bytes = a.n * sizeof(T);

  // Pages are taken in ticket order, so a CTA only ever waits on CTAs already running.
  if (threadIdx.x == 0) page_index = atomicAdd(a.ticket, 1u);
  __syncthreads();
  const uint32_t idx = page_index;
  const int64_t src_id = a.page_ids[idx];
  if (src_id < 0 || src_id >= a.src.count) {
    if (warp == 0) {
      if (lane == 0) publish_length(a.flags, idx, 0);
      const uint64_t off = look_back(a.flags, idx, 0, lane);
      if (lane == 0) {
        a.table[3 * idx] = static_cast<int64_t>(off);
        a.table[3 * idx + 1] = 0;
        a.table[3 * idx + 2] = kBadSourceIndex;
      }
    }
    return;
  }

  // Stage the page and find its range.
  const uint8_t* src = a.src.page(src_id);
  if (threadIdx.x == 0) src_s = src;
  float mx = -INFINITY, mn = INFINITY;
  bool nonfinite = false;
  if (staged_by_chunks(src, page_bytes)) {
    ChunkRange<Code> chunk_range;
    // Several loads in flight per thread before any is used: one at a time leaves
    // the memory system idle for most of a page's staging.
    constexpr int kInFlight = 4;
    const uint32_t chunks = page_bytes / 16;
    ChunkWalk walk = chunk_walk<Warps>(g, threadIdx.x, sizeof(T));
    for (uint32_t first = threadIdx.x; first < chunks; first += kThreads * kInFlight) {
      uint4 v[kInFlight];
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        const uint32_t k = first + u * kThreads;
        if (k < chunks) v[u] = reinterpret_cast<const uint4*>(src)[k];
      }
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        const uint32_t k = first + u * kThreads;
        if (k >= chunks) break;
        if (g.padded) {
          uint32_t* d = reinterpret_cast<uint32_t*>(smem + walk.at);
          d[0] = v[u].x;
          d[1] = v[u].y;
          d[2] = v[u].z;
          d[3] = v[u].w;
          walk.advance();
        } else {
          reinterpret_cast<uint4*>(smem)[k] = v[u];
        }
        chunk_range.add(v[u]);
      }
    }
    chunk_range.finish(mx, mn, nonfinite);
  } else {
    for (uint32_t i = threadIdx.x; i < a.n; i += kThreads) {
      const T v = reinterpret_cast<const T*>(src)[i];
      page[i] = v;
      const float f = C::to_f32(v);
      nonfinite |= !isfinite(f);
      mx = fmaxf(mx, f);
      mn = fminf(mn, f);
    }
  }
  // A raw page's payload is padded to whole words with zeros.
  if (!g.padded && threadIdx.x < L.page_bytes - page_bytes) smem[page_bytes + threadIdx.x] = 0;
  float* fscratch = reinterpret_cast<float*>(scratch);
  mx = block_reduce<Warps>(mx, fscratch, [](float x, float y) { return fmaxf(x, y); });
  mn = block_reduce<Warps>(mn, fscratch, [](float x, float y) { return fminf(x, y); });
  nonfinite = __syncthreads_or(nonfinite);
  if (threadIdx.x == 0) pq_s = choose_quant(Code, a.relative, a.eb, mx, mn, nonfinite);
  __syncthreads();
  // Pass 1: widths, section sizes and the bound check of every value. The page's
  // quantisation is read again from shared memory after it: held in registers across
  // the block loops, its raw reason is spilled.
  const PageQuant quant = pq_s;
  const uint2 run = warp_chunks<Warps>(B, warp);
  const LaneBlocks lb = lane_blocks<Code>(g, a.n, B);
  const LaneLayout layout = lane_layout(g, sizeof(T));
  uint32_t check = 0;
  uint2 sizes = make_uint2(0, 0);
  // A page with some |p| above 2^22 is RAW whatever its values give: no pass 1.
  if (quant.raw_reason == 0 && !quant_in_range(mx, mn, quant)) {
    check = kCheckBad;
  } else if (quant.raw_reason == 0) {
    const uint32_t eb_at = static_cast<uint32_t>(__cvta_generic_to_shared(&pq_s.eb));
    if (layout == LaneLayout::kRows1) {
      sizes = size_lane_blocks<Code, Mode, LaneLayout::kRows1>(lb, g, quant, run, widths, eb_at,
                                                               &check);
    } else if (layout == LaneLayout::kRows16) {
      sizes = size_lane_blocks<Code, Mode, LaneLayout::kRows16>(lb, g, quant, run, widths, eb_at,
                                                                &check);
    } else {
      sizes = size_lane_blocks<Code, Mode, LaneLayout::kAnyRows>(lb, g, quant, run, widths,
                                                                 eb_at, &check);
    }
  }
  check = __reduce_or_sync(kFull, check);
  if (lane == 0) {
    warp_sizes[warp] = sizes;
    warp_check[warp] = check;
  }
  __syncthreads();
  // This warp's offsets in the planes and outlier sections, the section totals and
  // the page's bound checks.
  uint2 base = make_uint2(0, 0), totals = make_uint2(0, 0);
  check = 0;
  for (int w = 0; w < Warps; ++w) {
    const uint2 v = warp_sizes[w];
    if (w < warp) {
      base.x += v.x;
      base.y += v.y;
    }
    totals.x += v.x;
    totals.y += v.y;
    check |= warp_check[w];
  }
  const PageQuant pq = pq_s;
  // A certainly bad value sends the page RAW at once; only ties (the same in every
  // thread) need the whole page checked again in binary64.
  const bool bad = (check & kCheckBad) != 0 ||
                   ((check & kCheckTie) != 0 &&
                    verify_exact<Warps, Code>(reinterpret_cast<const T*>(src_s), a.n, pq));

  // The record's RAW reason and length, the same in every thread (from the shared
  // totals): thread 0 publishes the length at once, every thread knows which kind of
  // payload to prepare before the offset is known.
  uint8_t reason = pq.raw_reason;
  if (reason == 0 && bad) reason = kRawBoundUnattainable;
  uint32_t payload_len = raw_payload_len(a.n, Code);
  if (reason == 0) {
    const uint32_t packed = compressed_payload_len(B, totals.y, totals.x);
    if (packed >= payload_len) {
      reason = kRawNoGain;
    } else {
      payload_len = packed;
    }
  }
  // The table row and the header are written from shared memory after the look-back's
  // wait: held in registers across it, their values are spilled on some targets
  // (sm_100).
  if (threadIdx.x == 0) {
    publish_length(a.flags, idx, round_up(kHeaderBytes + payload_len, kRecordAlign));
    payload_len_s = payload_len;
    outlier_total_s = totals.y;
    reason_s = reason;
  }
  // Work that needs no offset, done while the pages before this one finish: the
  // checksum terms of the widths section and of the kept plane words, whose checksum
  // indices are their places in the record. Their sum waits in shared memory, one
  // word a warp, for thread 0's header: held in a register across the wait and
  // pass 2 it was spilled (compress<fp32, outlier> on sm_80). A RAW page hashes its
  // payload as it copies it, after the wait.
  uint32_t early = 0;
  if (reason == 0) {
    early = checksum_shared_words<Warps>(reinterpret_cast<const uint32_t*>(widths),
                                         round_up(B, 4u), kHeaderChecksumWords);
    const uint32_t first = first_plane_index(B, totals.y);
    if (layout == LaneLayout::kRows1) {
      early +=
          checksum_kept_words<Code, Mode, LaneLayout::kRows1>(lb, run, widths, base.x, first);
    } else if (layout == LaneLayout::kRows16) {
      early +=
          checksum_kept_words<Code, Mode, LaneLayout::kRows16>(lb, run, widths, base.x, first);
    }
  }
  early = __reduce_add_sync(kFull, early);
  if (lane == 0) warp_early_sum[warp] = early;
  if (warp != 0) prefetch_next_page(a, idx, page_bytes, threadIdx.x - 32, kThreads - 32);
  if (warp == 0) {
    __syncwarp();  // thread 0's payload_len_s, to the warp
    // Warp 0's lanes are threads 0 to 31: the thread index, where `lane` had ptxas
    // hold a predicate of it across pass 1 and spill it (fp32 plain in CTAs of 2 and 4
    // warps, sm_89).
    const uint64_t offset = look_back(a.flags, idx,
                                      round_up(kHeaderBytes + payload_len_s, kRecordAlign),
                                      static_cast<int>(threadIdx.x));
    if (lane == 0) {
      offset_s = offset;
      int64_t* row = a.table + 3 * page_index;
      row[0] = static_cast<int64_t>(offset);
      row[1] = round_up(kHeaderBytes + payload_len_s, kRecordAlign);
      row[2] = reason_s;
    }
  }
  __syncthreads();

  // Pass 2: write the payload at the record's offset, then the header.
  uint8_t* payload = a.out + offset_s + kHeaderBytes;
  uint32_t sum;
  if (reason_s != 0) {
    // A padded page is not contiguous in shared memory, and one whose plane words
    // pass 1 kept no longer holds every value: the source page is copied instead when
    // it is 16-byte aligned (a padded one is), staged again otherwise.
    const uint8_t* raw = smem;
    if (g.padded || (check & kCheckKept) != 0) {
      if (staged_by_chunks(src_s, page_bytes)) {
        raw = src_s;
      } else {
        for (uint32_t i = threadIdx.x; i < a.n; i += kThreads) {
          page[i] = reinterpret_cast<const T*>(src_s)[i];
        }
        __syncthreads();
      }
    }
    sum = copy_checksum_words<Warps>(payload, raw, payload_len_s, kHeaderChecksumWords);
  } else {
    const uint32_t outlier_bytes = round_up(totals.y, 4u);
    // Padding bytes only: the blocks' bytes are written by pass 1 and below, and the
    // widths' padding bytes are the padding blocks of the last group, written by pass 1.
    for (uint32_t i = totals.y + threadIdx.x; i < outlier_bytes; i += kThreads) stage[i] = 0;
    uint32_t* planes =
        reinterpret_cast<uint32_t*>(payload) + (round_up(B, 4u) + outlier_bytes) / 4;
    // The quantisation from shared memory again, not held across the wait.
    const BlockCoder<Code, Mode> coder = block_coder<Code, Mode>(pq_s, a.n, B, lane);
    const uint32_t outliers_at =
        static_cast<uint32_t>(__cvta_generic_to_shared(&outlier_total_s));
    if (layout == LaneLayout::kRows1) {
      sum = write_lane_blocks<Code, Mode, LaneLayout::kRows1>(lb, coder, g, run, widths, base,
                                                              planes, outliers_at, stage);
    } else if (layout == LaneLayout::kRows16) {
      sum = write_lane_blocks<Code, Mode, LaneLayout::kRows16>(lb, coder, g, run, widths, base,
                                                               planes, outliers_at, stage);
    } else {
      sum = write_lane_blocks<Code, Mode, LaneLayout::kAnyRows>(lb, coder, g, run, widths, base,
                                                                planes, outliers_at, stage);
    }
    __syncthreads();
    // The widths were hashed before the wait; the outlier section, complete only now
    // (pass 2 stages the outliers), is hashed as it is copied out. The record's place
    // and sizes come from shared memory again: held in registers across
    // write_lane_blocks they would crowd its loop.
    uint8_t* payload_at = a.out + offset_s + kHeaderBytes;
    const uint32_t width_bytes = round_up(B, 4u);
    copy_words<Warps>(payload_at, widths, width_bytes);
    sum += copy_checksum_words<Warps>(payload_at + width_bytes, stage,
                                      round_up(outlier_total_s, 4u),
                                      kHeaderChecksumWords + width_bytes / 4);
  }
  const uint32_t record_end = round_up(kHeaderBytes + payload_len_s, kRecordAlign);
  uint8_t* record_at = a.out + offset_s;
  for (uint32_t i = kHeaderBytes + payload_len_s + 4 * threadIdx.x; i < record_end;
       i += 4 * kThreads) {
    *reinterpret_cast<uint32_t*>(record_at + i) = 0;
  }
  sum = block_reduce<Warps>(sum, scratch, [](uint32_t x, uint32_t y) { return x + y; });
  if (threadIdx.x == 0) {
    union {
      PageHeader h;
      uint4 v[2];
    } header;
    // The header's fields from shared memory again: held in registers across pass 2
    // they cost outlier mode a spill.
    header.h = make_header(Code, Mode, a.relative, a.n, a.rows, pq_s, reason_s, payload_len_s);
    for (int w = 0; w < Warps; ++w) sum += warp_early_sum[w];
    header.h.checksum = checksum_finish(sum + header_checksum_sum(header.h), header.h.payload_len);
    uint4* header_at = reinterpret_cast<uint4*>(a.out + offset_s);
    header_at[0] = header.v[0];
    header_at[1] = header.v[1];
  }
}

struct DecompressArgs {
  const uint8_t* buf;
  int64_t buf_size;
  const int64_t* table;
  int64_t table_cols;
  PageViews<uint8_t*> dst;
  const int64_t* dst_ids;
  int32_t* status;
  uint32_t n;
  uint32_t page_smem_bytes;
  // Destination rows start at 16-byte boundaries and shared memory has room for
  // padded pages (PageGeometry).
  bool allow_padding;
};

// Moves one page between shared memory and its (possibly unaligned) global home: 16
// bytes at a time when both ends are 16-byte aligned, then the values past the last
// whole 16 bytes (all of them otherwise) one at a time.
template <int Warps, typename T>
__device__ void copy_page(uint8_t* dst, const uint8_t* src, uint32_t n) {
  constexpr uint32_t kThreads = kCtaThreads<Warps>;
  uint32_t done = 0;
  if (((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15) == 0) {
    const uint32_t vecs = n * sizeof(T) / 16;
    for (uint32_t i = threadIdx.x; i < vecs; i += kThreads) {
      reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(src)[i];
    }
    done = vecs * 16 / sizeof(T);
  }
  for (uint32_t i = done + threadIdx.x; i < n; i += kThreads) {
    reinterpret_cast<T*>(dst)[i] = reinterpret_cast<const T*>(src)[i];
  }
}

// Header and record checks that need only the header (the first rows of the
// decode table in docs/format.md). Every thread runs them on its own copy: the
// warps load the same table row and header (one request a warp, served from L1
// after the first), where one thread loading them for all left 255 at a barrier
// through two dependent global latencies and needed the barrier besides.
__device__ int32_t check_record(const DecompressArgs& a, uint32_t idx, PageHeader* h,
                                int64_t* offset) {
  const int64_t dst_id = a.dst_ids[idx];
  if (dst_id < 0 || dst_id >= a.dst.count) return kBadIndex;
  const int64_t off = a.table[a.table_cols * idx], nb = a.table[a.table_cols * idx + 1];
  if (off < 0 || nb < kHeaderBytes || off % kRecordAlign != 0 || off > a.buf_size - nb) {
    return kBadRecord;
  }
  reinterpret_cast<uint4*>(h)[0] = reinterpret_cast<const uint4*>(a.buf + off)[0];
  reinterpret_cast<uint4*>(h)[1] = reinterpret_cast<const uint4*>(a.buf + off)[1];
  if (h->magic != kMagic || h->version != kVersion) return kBadMagic;
  if (h->payload_len % 4 != 0 || h->payload_len > nb - kHeaderBytes) return kBadRecord;
  *offset = off;
  return kOk;
}

// Checks that need the whole payload to have been summed; `sum` includes the
// header's terms.
__device__ int32_t check_payload(const PageHeader& h, uint32_t sum, uint8_t code, uint32_t n) {
  if (checksum_finish(sum, h.payload_len) != h.checksum) {
    return kBadChecksum;
  }
  if (h.dtype != code || h.n != n) return kMismatch;
  if ((h.flags & kFlagReservedMask) || h.reserved != 0) return kMalformed;
  if (h.flags & kFlagRaw) return h.payload_len == raw_payload_len(n, code) ? kOk : kMalformed;
  const uint32_t num_blocks = (n + kBlockValues - 1) / kBlockValues;
  if (h.mode > kOutlier || h.rows == 0 || n % h.rows != 0 || !isfinite(h.step) ||
      !(h.step > 0.0f) || round_up(num_blocks, 4) > h.payload_len) {
    return kMalformed;
  }
  return kOk;
}

// A compressed page's sections as the block loop reads them: the width bytes and
// the blocks' outliers in shared memory, the plane words in the record in global
// memory.
struct DecodeSource {
  const uint8_t* widths;  // zero from num_blocks to num_blocks + kDecodeAhead
  const uint32_t* outl;   // each block's outlier, decoded (outlier mode)
  const uint32_t* planes;
  uint32_t num_blocks;
};

// Sum of a word's four bytes, when it is below 256.
__device__ __forceinline__ uint32_t byte_sum(uint32_t v) { return (v * 0x01010101u) >> 24; }

// First plane word of each block of a group relative to the group's first, one a
// byte: the sums of group_block_words over the blocks before it (at most 75).
__device__ __forceinline__ uint32_t group_block_starts(uint32_t width_bytes) {
  return group_block_words(width_bytes) * 0x01010100u;
}

// What decoding a group of four blocks needs from memory before the transpose: the
// four width bytes, the group's first plane word and, for a group of widths at most
// 7, this lane's plane word (lane 8b + t word t of block b, 0 past the block's
// words). Zero for groups past the last (their width bytes are 0), so the loop
// fetches ahead with no bounds check. Each warp walks its own run of groups, so the
// first plane word of the next group is this one's plus its words: no table of
// per-block offsets, and no shared load between the width word and the plane word.
struct GroupFetch {
  uint32_t width_bytes;
  uint32_t word;
  uint32_t at;  // the group's first plane word
};

__device__ __forceinline__ GroupFetch fetch_group(const DecodeSource& s, uint32_t j, uint32_t at,
                                                  int lane) {
  GroupFetch g{*reinterpret_cast<const uint32_t*>(s.widths + j), 0u, at};
  if ((g.width_bytes & kWiderThan7) == 0) {
    const uint32_t b = lane >> 3, t = lane & 7;
    if (t < ((group_block_words(g.width_bytes) >> (8 * b)) & 0xFFu)) {
      g.word = s.planes[at + ((group_block_starts(g.width_bytes) >> (8 * b)) & 0xFFu) + t];
    }
  }
  return g;
}

// The group after g: its first plane word follows g's words (at most 100).
__device__ __forceinline__ uint32_t next_group_at(const GroupFetch& g) {
  return g.at + byte_sum(group_block_words(g.width_bytes));
}

// Residual of field b of a transposed word whose fields are `Field` bits: the sign in
// the lowest bit, the magnitude above (as compression's plane_row). Unsigned arithmetic: a forged
// stream with a valid checksum may overflow, never UB.
template <int Field>
__device__ __forceinline__ uint32_t field_residual(uint32_t x, int b) {
  const uint32_t field = Field == 32 ? x : (x >> (Field * b)) & ((1u << Field) - 1u);
  const uint32_t mag = field >> 1;
  return (field & 1u) ? 0u - mag : mag;
}

// The four residuals of a transposed word of 8-bit fields (widths at most 7, so
// |d| <= 127), two to a word: d_0 + 2^16 d_1 and d_2 + 2^16 d_3, exact as integers.
// Each sign flips its field by subtracting twice the magnitude, done on all four
// bytes at once before the bytes are spread to 16-bit halves.
__device__ __forceinline__ uint2 packed_residuals(uint32_t x) {
  const uint32_t mags = (x >> 1) & 0x7F7F7F7Fu;
  const uint32_t negated = mags & ((x & 0x01010101u) * 0xFFu);
  return make_uint2(__byte_perm(mags, 0, 0x4140) - 2u * __byte_perm(negated, 0, 0x4140),
                    __byte_perm(mags, 0, 0x4342) - 2u * __byte_perm(negated, 0, 0x4342));
}

// The two values of a word d_0 + 2^16 d_1 with |d_0|, |d_1| < 2^15.
__device__ __forceinline__ void unpack_halves(uint32_t v, uint32_t& low, uint32_t& high) {
  low = static_cast<uint32_t>(static_cast<int32_t>(static_cast<int16_t>(v & 0xFFFFu)));
  high = static_cast<uint32_t>(static_cast<int32_t>(v - low) >> 16);
}

// Inclusive sums over the lanes of v, two at a time so that the two chains of
// dependent shuffles interleave.
__device__ __forceinline__ void lane_prefix_sums(uint32_t& v0, uint32_t& v1) {
#pragma unroll
  for (int delta = 1; delta < 32; delta <<= 1) {
    v0 = add_from_lane_below(v0, delta);
    v1 = add_from_lane_below(v1, delta);
  }
}

// Residuals of G blocks of a group from one transpose (G = 2 or 1: the group has a
// width above 7), loading each block's words (docs/format.md) into the lanes of its field.
template <int G>
__device__ __forceinline__ void load_transpose(const DecodeSource& s, uint32_t j,
                                               const GroupFetch& g, const BitTranspose& transpose,
                                               int lane, uint32_t* d) {
  constexpr int kField = 32 / G;
  const uint32_t b = lane / kField, t = lane % kField, shift = 8 * (j % kGroupBlocks);
  const uint32_t words = group_block_words(g.width_bytes >> shift);
  const uint32_t starts = group_block_starts(g.width_bytes) >> shift;
  uint32_t word = 0;
  if (t < ((words >> (8 * b)) & 0xFFu)) word = s.planes[g.at + ((starts >> (8 * b)) & 0xFFu) + t];
  const uint32_t x = transpose(word);
#pragma unroll
  for (int i = 0; i < G; ++i) d[i] = field_residual<kField>(x, i);
}

// The lane's quantised values of the four blocks of a fetched group, from block j on.
// The checks before the block loop bound every width by kMaxWidth, so lanes past a
// block's words hold zero words and a block of width 0 decodes to zeros through the
// same instructions.
template <uint8_t Mode>
__device__ __forceinline__ void decode_group(const DecodeSource& s, const GroupFetch& g,
                                             uint32_t j, const BitTranspose& transpose, int lane,
                                             uint32_t (&q)[kGroupBlocks]) {
  if ((g.width_bytes & kWiderThan7) == 0) {
    uint2 pairs = packed_residuals(transpose(g.word));
    if constexpr (Mode == kOutlier) {
      if (lane == 0) pairs = make_uint2(0, 0);
    }
    // Residuals of at most 127 bound every sum over a block by 32 * 127 < 2^15, so
    // the two blocks of a word are summed together, exactly.
    if constexpr (Mode != kFixed) lane_prefix_sums(pairs.x, pairs.y);
    unpack_halves(pairs.x, q[0], q[1]);
    unpack_halves(pairs.y, q[2], q[3]);
  } else {
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      if (((g.width_bytes >> (16 * p)) & kWiderThan15 & 0xFFFFu) == 0) {
        load_transpose<2>(s, j + 2 * p, g, transpose, lane, q + 2 * p);
      } else {
        load_transpose<1>(s, j + 2 * p, g, transpose, lane, q + 2 * p);
        load_transpose<1>(s, j + 2 * p + 1, g, transpose, lane, q + 2 * p + 1);
      }
    }
    if constexpr (Mode == kOutlier) {
      if (lane == 0) q[0] = q[1] = q[2] = q[3] = 0;
    }
    if constexpr (Mode != kFixed) {
      lane_prefix_sums(q[0], q[1]);
      lane_prefix_sums(q[2], q[3]);
    }
  }
  if constexpr (Mode == kOutlier) {
    // Lane 0's residual is not part of the stream's value: the outlier is. Read here,
    // not fetched ahead: four more registers across the loop would spill.
    if (g.width_bytes & 0x60606060u) {
      const uint4 o = *reinterpret_cast<const uint4*>(s.outl + j);
      q[0] += o.x;
      q[1] += o.y;
      q[2] += o.z;
      q[3] += o.w;
    }
  }
}

// The warp path of decompression's block loop, built per mode: each warp decodes its
// run of groups of four blocks, one transpose a group when the widths allow,
// and fetches the next group's words before decoding this one, so that their L2
// latency is spent on work (docs/codec-kernel-notes.md, "Third round" and "Fourth
// round").
template <uint8_t Code, uint8_t Mode, bool Wraps>
__device__ __forceinline__ void decode_blocks(const DecodeSource& s, uint2 run, uint32_t run_at,
                                              StreamCursor cur, float step, uint32_t n) {
  using C = CudaType<Code>;
  const int lane = threadIdx.x & 31;
  const BitTranspose transpose = bit_transpose();
  // Blocks from here on are past n in this lane: not stored.
  const uint32_t lane_end = static_cast<uint32_t>(lane) < n - (s.num_blocks - 1) * kBlockValues
                                ? s.num_blocks
                                : s.num_blocks - 1;
  cur = in_shared_addresses(cur, sizeof(typename C::type));
  GroupFetch next = fetch_group(s, run.x, run_at, lane);
  for (uint32_t j = run.x; j < run.y; j += kGroupBlocks) {
    const GroupFetch g = next;
    next = fetch_group(s, j + kGroupBlocks, next_group_at(g), lane);
    uint32_t q[kGroupBlocks];
    decode_group<Mode>(s, g, j, transpose, lane, q);
    const uint32_t stored = lane_end - j;  // blocks of the group this lane stores (if < 4)
#pragma unroll
    for (int b = 0; b < kGroupBlocks; ++b) {
      if (static_cast<int32_t>(stored) > b) {
        C::store_staged(cur.index, mul_rn(__int2float_rn(static_cast<int32_t>(q[b])), step));
      }
      cur.advance<Wraps>();
    }
  }
}

// One lane, one block: the block loop's path for runs of 32 blocks whose widths are
// all at most 7 (decode_chunks). A warp's 32 lanes take 32 consecutive blocks, each
// lane its own, so the bit transpose, the sign decoding and plain mode's prefix sum
// are done in registers with no shuffle, and each instruction serves 32 blocks where
// the warp path's (decode_group) serves at most four (docs/codec-kernel-notes.md,
// "Seventh round").

// The lane's plane words, sign word first, zero past its `words` (at most 8 for a
// width of at most 7).
__device__ __forceinline__ void load_lane_planes(const uint32_t* planes, uint32_t words,
                                                 uint32_t (&x)[8]) {
#pragma unroll
  for (uint32_t p = 0; p < 8; ++p) x[p] = p < words ? planes[p] : 0u;
}

// Turns a block's sign word and seven magnitude words (x[0], x[1..7]) into the eight
// bit planes of u_i = d_i + 128 (d_i's 8-bit two's complement with bit 7 flipped), in
// place. A negative value's bits are those of ~(|d| - 1): the borrow of |d| - 1
// ripples up the planes in the lanes whose sign is set. A sign over a zero magnitude
// (forged, valid checksum) borrows out of the top and gives 0, as the CPU decoder's
// 0 - 0. The offset makes every field non-negative, so that a byte becomes a float
// with one byte permute (lane_values).
__device__ __forceinline__ void offset_binary_planes(uint32_t (&x)[8]) {
  const uint32_t sign = x[0];
  uint32_t borrow = sign;
#pragma unroll
  for (int b = 0; b < 7; ++b) {
    const uint32_t m = x[b + 1];
    x[b] = m ^ borrow ^ sign;
    borrow &= ~m;
  }
  x[7] = ~(borrow ^ sign);
}

// A byte u placed in the mantissa of 2^23 is the f32 2^23 + u, exactly; subtracting
// 2^23 + 128 leaves d = u - 128, exactly: one byte permute and one f32 add a value, as
// many as a sign-extending permute and an integer conversion, but the add issues to
// the FMA pipe while the transpose and the sign planes keep the integer pipe busy.
// 2^23 is the permute's first operand, u the second: with u first, ptxas kept 2^23 as
// the instruction's immediate and moved the selector into a register before each of
// the 32 permutes of a rows-1 block (30 instructions a run of 32 on sm_90).
constexpr uint32_t kMagicBits = 0x4B000000u;  // 2^23 as f32
constexpr float kMagicOffset = 8388736.0f;    // 2^23 + 128

// The lane's 32 decoded values, y_i = f32(q_i) * step, from the transposed bytes u
// (byte c of u[r] is value 8c + r). Every q_i of a block of widths at most 7 is an
// integer below 2^24 in magnitude (an outlier below 2^23 plus 31 residuals of at
// most 127), so the running sums in f32 are exact and equal the CPU decoder's
// integers, for forged streams too. Values come out in pairs, (2k, 2k + 1) or, with
// Halves, (k, k + 16): then values 16..31 are summed in a chain of their own,
// started from the sum of bytes 0..15 (a byte dot product a word), so that neither
// half waits in registers for the other and the two chains overlap.
template <uint8_t Mode, bool Halves>
__device__ __forceinline__ void lane_values(uint32_t (&u)[8], uint32_t outlier, float step,
                                            float (&y)[kBlockValues]) {
  // Outlier mode: the first residual is not part of the value, the outlier is.
  if constexpr (Mode == kOutlier) u[0] = (u[0] & ~0xFFu) | 0x80u;
  const float start = Mode == kOutlier ? static_cast<float>(static_cast<int32_t>(outlier)) : 0.0f;
  float sum[2] = {start, start};
  if constexpr (Halves && Mode != kFixed) {
    uint32_t low = 0;
#pragma unroll
    for (int r = 0; r < 8; ++r) low = __dp4a(u[r], 0x0101u, low);
    // d_0 + ... + d_15 = low - 16 * 128, made exact like a residual.
    sum[1] = __fadd_rn(start, __fsub_rn(__uint_as_float(kMagicBits | low), 8390656.0f));
  }
#pragma unroll
  for (int k = 0; k < 16; ++k) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int i = Halves ? 16 * h + k : 2 * k + h, chain = Halves ? h : 0;
      const float d = __fsub_rn(
          __uint_as_float(__byte_perm(kMagicBits, u[i % 8], 0x3004 + i / 8)), kMagicOffset);
      if constexpr (Mode == kFixed) {
        sum[chain] = d;
      } else if (Mode == kPlain && i == 0) {
        sum[0] = d;
      } else {
        sum[chain] = __fadd_rn(sum[chain], d);
      }
      y[i] = mul_rn(sum[chain], step);
    }
  }
}

// Two values as one word of a 16-bit type, the first in the low half.
template <uint8_t Code>
__device__ __forceinline__ uint32_t packed_pair(float lo, float hi) {
  if constexpr (Code == kBf16) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

// Where decode_chunks puts a lane's block when rows is 1: the staged page in memory
// order, block j's values from byte j * 32 * sizeof(T), kChunks 16-byte chunks (4,
// fp32 8), which the CTA copies out with the rest of the page after the block loop in
// coalesced 16-byte stores (stored straight into the destination, each lane's block
// 64 bytes from the next, every store instruction touched 16 cache lines). A 16-byte
// shared store is served a quarter of the warp (8 lanes, 128 bytes) at a time; stored
// in the same order, the chunks of 8 consecutive blocks would fall in 2 (fp32: 1) of
// a row's 8 bank quads, 4-way (8-way) conflicts. Lane i stores, at step p, its chunk
// p ^ x with x = i / 2 mod 4 (fp32 i mod 4), so the 8 lanes of a quarter write 8
// different quads (fp32 4: 2-way conflicts). Putting the chunks in that order costs a
// select a word for each of the two bits of x: 32 a block, fp32 64. A third bit for
// fp32 (conflict-free, 96 selects) spilled 16 bytes on sm_90.
template <uint8_t Code>
struct Rows1Sink {
  using T = typename CudaType<Code>::type;
  static constexpr bool kHalves = false;
  static constexpr int kChunks = kBlockValues * sizeof(T) / 16;
  uint32_t base;  // shared address of the staged page
  __device__ __forceinline__ void store(uint32_t j, const float (&y)[kBlockValues]) const {
    uint32_t w[kChunks][4];
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if constexpr (sizeof(T) == 2) {
          w[k][e] = packed_pair<Code>(y[8 * k + 2 * e], y[8 * k + 2 * e + 1]);
        } else {
          w[k][e] = __float_as_uint(y[4 * k + e]);
        }
      }
    }
    const uint32_t x = (threadIdx.x & 31) * kChunks / 8 % 4;
    // Chunk k moves to place k ^ x (within its four), one bit of x at a time.
#pragma unroll
    for (int b = 1; b < 4; b <<= 1) {
      const bool swap = (x & b) != 0;
#pragma unroll
      for (int k = 0; k < kChunks; ++k) {
        if (k & b) continue;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const uint32_t lo = w[k][e], hi = w[k | b][e];
          w[k][e] = swap ? hi : lo;
          w[k | b][e] = swap ? lo : hi;
        }
      }
    }
    const uint32_t at = base + j * kChunks * 16;
#pragma unroll
    for (int p = 0; p < kChunks; ++p) {
      store_shared_vec(at + 16 * (p ^ x), make_uint4(w[p][0], w[p][1], w[p][2], w[p][3]));
    }
  }
};

// Where decode_chunks puts a lane's block when rows is 16: value i of block j is at
// row i mod 16, column 2j + i / 16 of the staged page, so values i and i + 16 are
// neighbours: one 4-byte store for the pair of a 16-bit type (the pitch is even),
// and consecutive lanes write consecutive words, free of bank conflicts.
template <uint8_t Code>
struct Rows16Sink {
  using T = typename CudaType<Code>::type;
  static constexpr bool kHalves = true;
  uint32_t base;         // shared address of the staged page
  uint32_t pitch_bytes;  // a multiple of 4
  __device__ __forceinline__ void store(uint32_t j, const float (&y)[kBlockValues]) const {
    uint32_t at = base + j * 2 * static_cast<uint32_t>(sizeof(T));
#pragma unroll
    for (int i = 0; i < 16; ++i, at += pitch_bytes) {
      if constexpr (sizeof(T) == 2) {
        store_shared_word(at, packed_pair<Code>(y[i], y[i + 16]));
      } else {
        store_shared_word(at, __float_as_uint(y[i]));
        store_shared_word(at + 4, __float_as_uint(y[i + 16]));
      }
    }
  }
};

// The block loop of a page whose rows is 1 or 16: the warp takes its run 32 blocks
// at a time, lane i block j0 + i. A warp scan of the blocks' plane words gives each
// lane its first word. If every width of the 32 is at most 7 and none of the blocks
// is the page's partial last one, each lane decodes its block alone (load_lane_planes
// to lane_values) and the sink stores it. Other runs of 32 are left to a second loop
// that decodes them a group of four at a time (decode_blocks), which handles any
// width and the last block: kept apart, the two loops' registers do not add up.
template <uint8_t Code, uint8_t Mode, typename Sink>
__device__ void decode_chunks(const DecodeSource& s, const PageGeometry& g, uint2 run, uint32_t at,
                              float step, uint32_t n, const Sink& sink) {
  const int lane = threadIdx.x & 31;
  const uint32_t full_blocks = n / kBlockValues;
  // Lane k holds, if the run's k-th 32 blocks are left to the warp path, their first
  // block above bit kDeferredBlockShift and their first plane word below it (a page
  // of at most 4088 blocks, decompress_cuda, has fewer than 2^17 words even with
  // forged widths), kNotDeferred otherwise; a run has at most 16 of them. Nothing
  // else stays live across the warp path: with a mask and the run held besides, its
  // registers spilled or needed a stack frame on sm_80, sm_89 and sm_100.
  constexpr uint32_t kNotDeferred = ~0u;
  constexpr int kDeferredBlockShift = 17;
  uint32_t deferred_at = kNotDeferred;
  // Counts down the run's blocks from j0 on: a register ptxas keeps, where it would
  // rebuild run.y from the launch geometry twice a run of 32 (about 25 instructions).
  uint32_t left = run.y - run.x;
  for (uint32_t j0 = run.x, k = 0; left > 0; j0 += 32, left -= min(left, 32u), ++k) {
    const uint32_t j = j0 + lane, end = j0 + min(left, 32u);
    const uint32_t f = static_cast<uint32_t>(lane) < left ? s.widths[j] & 0x1Fu : 0u;
    const uint32_t words = block_words(static_cast<int>(f));
    const uint32_t incl = lane_prefix_sum(words);
    const bool partial = end > full_blocks && full_blocks < s.num_blocks;
    if (!partial && !__any_sync(kFull, f > 7)) {
      uint32_t x[8];
      load_lane_planes(s.planes + at + incl - words, words, x);
      const uint32_t outlier =
          Mode == kOutlier && static_cast<uint32_t>(lane) < left ? s.outl[j] : 0u;
      offset_binary_planes(x);
      transpose_fields(x);
      float y[kBlockValues];
      lane_values<Mode, Sink::kHalves>(x, outlier, step, y);
      if (j < s.num_blocks) sink.store(j, y);
    } else if (static_cast<uint32_t>(lane) == k) {
      deferred_at = j0 << kDeferredBlockShift | at;
    }
    at += __shfl_sync(kFull, incl, 31);
  }
  for (uint32_t deferred; (deferred = __ballot_sync(kFull, deferred_at != kNotDeferred)) != 0;) {
    const int k = __ffs(deferred) - 1;
    const uint32_t held = __shfl_sync(kFull, deferred_at, k);
    if (lane == k) deferred_at = kNotDeferred;
    // The run's end, run.y, is a multiple of 32 past j0 or the page's last group.
    const uint32_t j0 = held >> kDeferredBlockShift;
    const uint32_t end = min(j0 + 32, round_up(s.num_blocks, kGroupBlocks));
    decode_blocks<Code, Mode, false>(s, make_uint2(j0, end),
                                     held & ((1u << kDeferredBlockShift) - 1u),
                                     stream_cursor(g, j0 * kBlockValues + lane, kBlockValues),
                                     step, n);
  }
}

// How a page's block loop stages its values in shared memory, which the whole CTA
// copies out after the loop: the warp path for every block (any rows); a lane a
// block where the widths allow, in memory order (rows 1) or in column pairs (rows 16,
// pitch a multiple of 4 bytes).
enum class PageLayout : uint8_t { kStaged, kRows1, kRows16 };

// From the page's geometry as published in shared memory.
__device__ __forceinline__ PageLayout page_layout(const PageGeometry& g, uint32_t elem_bytes) {
  if (g.rows.d == 1) return PageLayout::kRows1;
  if (g.rows.d == 16 && g.pitch * elem_bytes % 4 == 0) return PageLayout::kRows16;
  return PageLayout::kStaged;
}

// Decodes the warp's run of blocks in mode Mode; the run's first plane word is
// `run_at`. In the staged layout, when `rows` divides a block's 32 positions, a
// lane's row never changes and the cursor moves by one add: a loop of its own saves
// the wrap test on every block.
template <uint8_t Code, uint8_t Mode>
__device__ void decode_page(const DecodeSource& s, const PageGeometry& g, PageLayout layout,
                            uint2 run, uint32_t run_at, float step, uint32_t n) {
  using T = typename CudaType<Code>::type;
  if (layout == PageLayout::kRows1) {
    decode_chunks<Code, Mode>(s, g, run, run_at, step, n, Rows1Sink<Code>{staged_page_address()});
    return;
  }
  if (layout == PageLayout::kRows16) {
    decode_chunks<Code, Mode>(s, g, run, run_at, step, n,
                              Rows16Sink<Code>{staged_page_address(),
                                               g.pitch * static_cast<uint32_t>(sizeof(T))});
    return;
  }
  const int lane = threadIdx.x & 31;
  const StreamCursor cur = stream_cursor(g, run.x * kBlockValues + lane, kBlockValues);
  if (cur.step_row == 0) {
    decode_blocks<Code, Mode, false>(s, run, run_at, cur, step, n);
  } else {
    decode_blocks<Code, Mode, true>(s, run, run_at, cur, step, n);
  }
}

// Checksum terms of a record's payload, `count` words from `words` (16-byte
// aligned), word i at checksum index kHeaderChecksumWords + i, four 16-byte loads
// in flight per thread, so that L2 latency overlaps. Also gives this thread's 16-byte
// vector threadIdx.x of the payload (zero past `count`): the width bytes, so that
// they are parsed from the registers the checksum pass loaded them into instead of
// being read from global memory again. Vector k is thread k % kThreads's, the last,
// partial one included.
template <int Warps>
__device__ uint32_t checksum_payload(const uint32_t* words, uint32_t count, uint4& first) {
  constexpr uint32_t kThreads = kCtaThreads<Warps>;
  constexpr int kInFlight = 4;
  const uint4* vecs = reinterpret_cast<const uint4*>(words);
  const uint32_t vend = count / 4;
  uint32_t sum = 0;
  first = make_uint4(0, 0, 0, 0);
  for (uint32_t k0 = threadIdx.x; k0 < vend; k0 += kThreads * kInFlight) {
    uint4 v[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const uint32_t k = k0 + u * kThreads;
      if (k < vend) v[u] = vecs[k];
    }
    if (k0 == threadIdx.x) first = v[0];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const uint32_t k = k0 + u * kThreads;
      if (k >= vend) break;
      const uint32_t at = kHeaderChecksumWords + 4 * k;
      sum += checksum_term(v[u].x, at) + checksum_term(v[u].y, at + 1) +
             checksum_term(v[u].z, at + 2) + checksum_term(v[u].w, at + 3);
    }
  }
  const uint32_t rest = count - 4 * vend;
  if (rest > 0 && threadIdx.x == vend % kThreads) {
    uint32_t w[3] = {0, 0, 0};
#pragma unroll
    for (uint32_t i = 0; i < 3; ++i) {
      if (i < rest) {
        w[i] = words[4 * vend + i];
        sum += checksum_term(w[i], kHeaderChecksumWords + 4 * vend + i);
      }
    }
    if (vend < kThreads) first = make_uint4(w[0], w[1], w[2], 0);
  }
  return sum;
}

// A thread's plane words and outlier bytes counted together: words in the low
// kOutlierCountShift bits, outlier bytes above. decompress_cuda bounds a page by
// 16 T - kDecodeAhead blocks for T threads, at most 4088 (8 warps); even with
// malformed width bytes a block counts at most 32 words and 3 bytes, so a page's sums
// (< 2^17 and < 2^14) fit exactly.
constexpr int kOutlierCountShift = 18;
constexpr uint32_t kWordCountMask = (1u << kOutlierCountShift) - 1u;

__device__ __forceinline__ uint32_t group_counts(uint32_t width_bytes) {
  return byte_sum(group_block_words(width_bytes)) |
         byte_sum((width_bytes >> 5) & 0x03030303u) << kOutlierCountShift;
}

// Width bytes of blocks first_block .. first_block + 3 with those at or past
// num_blocks zeroed: the section's zero padding is not checked (nor by the CPU
// decoder), and the block loop reads the bytes past the last block as width 0.
__device__ __forceinline__ uint32_t blocks_before(uint32_t width_bytes, uint32_t first_block,
                                                  uint32_t num_blocks) {
  if (first_block >= num_blocks) return 0;
  const uint32_t left = num_blocks - first_block;
  return left >= 4 ? width_bytes : width_bytes & ((1u << (8 * left)) - 1u);
}

// Whether any of four width bytes is malformed (docs/format.md, "Decoding"): bit 7
// set, a width over 24 (adding 103 sets bit 7 of a byte exactly then; at most
// 31 + 103, no carry) or outlier bytes outside outlier mode.
__device__ __forceinline__ bool malformed_widths(uint32_t width_bytes, bool outlier_mode) {
  const uint32_t over = ((width_bytes & 0x1F1F1F1Fu) + 0x67676767u) | width_bytes;
  return (over & 0x80808080u) != 0 || (!outlier_mode && (width_bytes & 0x60606060u) != 0);
}

// Outlier mode: the warp replaces each block of its run by its decoded outlier in
// `outl`, once, so that the block loop reads one shared word where it would load up
// to three bytes from global memory. `at` is the run's first outlier byte. A lane
// takes a group at a time: its four blocks' bytes follow the bytes of the groups of
// the lanes below (a scan over the lanes) and of the earlier rounds. The padding
// blocks of the last group (width bytes 0) get 0: the loop reads a group's four
// outliers at once. Only this warp reads these entries.
__device__ void decode_outliers(const uint8_t* widths, const uint8_t* outliers, uint2 run,
                                uint32_t at, uint32_t* outl) {
  const int lane = threadIdx.x & 31;
  for (uint32_t j0 = run.x; j0 < run.y; j0 += kGroupBlocks * 32) {
    const uint32_t j = j0 + kGroupBlocks * lane;
    const uint32_t k = j < run.y ? (*reinterpret_cast<const uint32_t*>(widths + j) >> 5) & 0x03030303u
                                 : 0u;
    const uint32_t incl = lane_prefix_sum(byte_sum(k));
    uint32_t from = at + incl - byte_sum(k), z[kGroupBlocks];
#pragma unroll
    for (int b = 0; b < kGroupBlocks; ++b) {
      const uint32_t bytes = (k >> (8 * b)) & 3u;
      z[b] = 0;
      for (uint32_t i = 0; i < bytes; ++i) z[b] |= static_cast<uint32_t>(outliers[from + i]) << (8 * i);
      from += bytes;
    }
    if (j < run.y) {
      *reinterpret_cast<uint4*>(outl + j) =
          make_uint4(unzigzag(z[0]), unzigzag(z[1]), unzigzag(z[2]), unzigzag(z[3]));
    }
    at += __shfl_sync(kFull, incl, 31);
  }
  __syncwarp();
}

// At least 40 warps an SM (5 CTAs of 8 warps, as many as shared memory allows for
// 32 KiB pages, 10 of 4, 20 of 2): without the bound the two-block loop takes 64
// registers (32 warps); in 48 it does not spill.
//
// Per page: every thread checks the record's header itself; one checksum pass also
// parses and counts the width bytes (thread t holds blocks 16t .. 16t + 15); one
// barrier publishes each warp's checksum sum and counts, every thread's
// counts before it in its warp, the width bytes and the geometry. Each warp then
// knows the first plane word and outlier byte of its own run of groups and walks
// them: no per-block table of offsets, no block-wide scan. The same barrier ORs
// the width checks and publishes the destination page, found once by thread 0 (its
// 64-bit divisions are not every thread's). The block loop stages the page in shared
// memory, and after a second barrier the CTA copies it out.
template <int Warps, uint8_t Code>
__global__ void __launch_bounds__(kCtaThreads<Warps>, 40 / Warps)
    decompress_kernel(DecompressArgs a) {
  using C = CudaType<Code>;
  using T = typename C::type;
  constexpr uint32_t kThreads = kCtaThreads<Warps>;
  __shared__ uint2 warp_totals[Warps];          // checksum sum, counts
  __shared__ uint32_t counts_before[kThreads];  // counts of the warp's lanes below
  __shared__ PageGeometry geometry_s;
  __shared__ uint8_t* dst_s;
  const SharedLayout L = shared_layout(a.page_smem_bytes, a.n);
  uint8_t* widths = smem + L.widths_at();
  uint32_t* outl = reinterpret_cast<uint32_t*>(smem + L.outl_at());
  const uint32_t idx = blockIdx.x, B = L.num_blocks;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  PageHeader h;
  int64_t offset;
  int32_t status = check_record(a, idx, &h, &offset);
  if (status != kOk) {
    if (threadIdx.x == 0) a.status[idx] = status;
    return;
  }
  // The destination page's 64-bit divisions by one thread, published by the barrier
  // below; here, before the checksum pass, few registers are live across their call.
  if (threadIdx.x == 0) dst_s = a.dst.page(a.dst_ids[idx]);
  const uint8_t* payload = a.buf + offset + kHeaderBytes;
  uint4 first;
  uint32_t sum = checksum_payload<Warps>(reinterpret_cast<const uint32_t*>(payload),
                                         h.payload_len / 4, first);
  if (threadIdx.x == 0) sum += header_checksum_sum(h);

  // Parsed before the header's own checks have passed, and used only after them.
  const uint32_t first_block = 16 * threadIdx.x;
  const uint4 wv = make_uint4(blocks_before(first.x, first_block, B),
                              blocks_before(first.y, first_block + 4, B),
                              blocks_before(first.z, first_block + 8, B),
                              blocks_before(first.w, first_block + 12, B));
  const bool outlier_mode = h.mode == kOutlier;
  const bool malformed = malformed_widths(wv.x, outlier_mode) ||
                         malformed_widths(wv.y, outlier_mode) ||
                         malformed_widths(wv.z, outlier_mode) || malformed_widths(wv.w, outlier_mode);
  const uint32_t counts =
      group_counts(wv.x) + group_counts(wv.y) + group_counts(wv.z) + group_counts(wv.w);
  if (first_block < L.widths_end() - L.widths_at()) {
    *reinterpret_cast<uint4*>(widths + first_block) = wv;
  }
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(kFull, sum, o);
  const uint32_t counts_incl = lane_prefix_sum(counts);
  counts_before[threadIdx.x] = counts_incl - counts;
  if (lane == 31) warp_totals[warp] = make_uint2(sum, counts_incl);
  // The 64-bit divisions of the geometry by one thread, before the barrier; rows
  // must be checked first (check_payload rejects the page otherwise).
  if (threadIdx.x == 0 && h.rows != 0 && a.n % h.rows == 0) {
    geometry_s = page_geometry(a.n, h.rows, sizeof(T), a.allow_padding);
  }
  // The page's one barrier before the block loop; it also ORs the width checks.
  const bool any_malformed = __syncthreads_or(malformed);

  // Garbage for a page whose rows is invalid, which check_payload rejects below.
  const PageLayout layout = page_layout(geometry_s, sizeof(T));
  // The warp's run and the thread that holds its first block's width byte.
  const uint2 run =
      layout == PageLayout::kStaged ? warp_blocks<Warps>(B, warp) : warp_chunks<Warps>(B, warp);
  const uint32_t holder = run.x / 16;
  uint32_t total_sum = 0, total_counts = 0, run_counts = counts_before[holder];
#pragma unroll
  for (int w = 0; w < Warps; ++w) {
    const uint2 t = warp_totals[w];
    total_sum += t.x;
    total_counts += t.y;
    if (static_cast<uint32_t>(w) < holder / 32) run_counts += t.y;
  }
  status = check_payload(h, total_sum, Code, a.n);
  if (status == kOk && !(h.flags & kFlagRaw) &&
      (any_malformed ||
       compressed_payload_len(B, total_counts >> kOutlierCountShift,
                              total_counts & kWordCountMask) != h.payload_len)) {
    status = kMalformed;
  }
  if (status != kOk) {
    if (threadIdx.x == 0) a.status[idx] = status;
    return;
  }
  if (h.flags & kFlagRaw) {
    copy_page<Warps, T>(dst_s, payload, a.n);
    if (threadIdx.x == 0) a.status[idx] = kOk;
    return;
  }
  // Add the groups of the holder's sixteen blocks before the run's first.
  const uint4 held = *reinterpret_cast<const uint4*>(widths + 16 * holder);
  const uint32_t groups_before = (run.x / kGroupBlocks) % 4;
  if (groups_before > 0) run_counts += group_counts(held.x);
  if (groups_before > 1) run_counts += group_counts(held.y);
  if (groups_before > 2) run_counts += group_counts(held.z);

  const uint8_t* outliers = payload + round_up(B, 4);
  if (h.mode == kOutlier) {
    decode_outliers(widths, outliers, run, run_counts >> kOutlierCountShift, outl);
  }
  const DecodeSource source{
      widths, outl,
      reinterpret_cast<const uint32_t*>(
          outliers + round_up(total_counts >> kOutlierCountShift, 4)),
      B};
  const uint32_t run_at = run_counts & kWordCountMask;
  switch (h.mode) {
    case kFixed:
      decode_page<Code, kFixed>(source, geometry_s, layout, run, run_at, h.step, a.n);
      break;
    case kPlain:
      decode_page<Code, kPlain>(source, geometry_s, layout, run, run_at, h.step, a.n);
      break;
    default:
      decode_page<Code, kOutlier>(source, geometry_s, layout, run, run_at, h.step, a.n);
  }
  __syncthreads();
  // The destination and the geometry read only now: held in registers across the
  // block loop they would be spilled.
  uint8_t* const dst = dst_s;
  const PageGeometry g = geometry_s;
  if (g.padded) {
    for (uint32_t k = threadIdx.x; k < a.n * sizeof(T) / 16; k += kThreads) {
      const uint32_t* w = reinterpret_cast<const uint32_t*>(smem + staged_chunk_offset(g, k, sizeof(T)));
      reinterpret_cast<uint4*>(dst)[k] = make_uint4(w[0], w[1], w[2], w[3]);
    }
  } else {
    copy_page<Warps, T>(dst, smem, a.n);
  }
  if (threadIdx.x == 0) a.status[idx] = kOk;
}

// What the runtime says of one kernel on one device, asked once. A store or load
// launches the codec once per KV chunk, several times per engine step; with
// cudaFuncGetAttributes and cudaFuncSetAttribute on every launch, compress took
// about 0.3 ms of host time per call on the H100 against 56 us for decompress.
struct KernelShared {
  uint32_t limit = 0;   // dynamic shared memory a CTA may have
  uint32_t raised = 0;  // the kernel's dynamic shared-memory maximum as set so far
  std::map<uint32_t, int> resident;  // CTAs an SM holds, by dynamic shared memory
};

std::mutex& kernel_shared_mutex() {
  static std::mutex mutex;
  return mutex;
}

// The caller holds kernel_shared_mutex().
KernelShared& kernel_shared(const void* kernel) {
  static std::map<std::pair<int, const void*>, KernelShared> known;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  auto [it, fresh] = known.try_emplace({device, kernel});
  if (fresh) {
    int optin = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    cudaFuncAttributes attrs;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attrs, kernel));
    it->second.limit = static_cast<uint32_t>(optin) - static_cast<uint32_t>(attrs.sharedSizeBytes);
  }
  return it->second;
}

// Dynamic shared memory one CTA of `kernel` may have on the current device.
template <typename Kernel>
uint32_t dynamic_shared_memory_limit(Kernel kernel) {
  const std::lock_guard<std::mutex> lock(kernel_shared_mutex());
  return kernel_shared(reinterpret_cast<const void*>(kernel)).limit;
}

// Raises the kernel's dynamic shared-memory maximum to `bytes` unless an earlier call
// did. The caller holds kernel_shared_mutex().
void raise_shared_memory(const void* kernel, KernelShared& shared, uint32_t bytes) {
  if (bytes > shared.raised) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    shared.raised = bytes;
  }
}

// Raises the kernel's dynamic shared-memory maximum to `bytes` unless an earlier
// launch did, or says why the page is too large for `limit`
// (dynamic_shared_memory_limit).
// Numbers are formatted before they reach TORCH_CHECK (see torch_bindings.cpp).
template <typename Kernel>
void prepare_shared_memory(Kernel kernel, uint32_t bytes, uint32_t limit, uint32_t n,
                           int elem_bytes) {
  TORCH_CHECK_VALUE(bytes <= limit, "kvcompress: pages of " + std::to_string(n) + " x " +
                    std::to_string(elem_bytes) + " bytes need " + std::to_string(bytes) +
                    " bytes of shared memory; this GPU allows " + std::to_string(limit) +
                    ". Use smaller pages (split each KV block into several pages).");
  const std::lock_guard<std::mutex> lock(kernel_shared_mutex());
  const void* k = reinterpret_cast<const void*>(kernel);
  raise_shared_memory(k, kernel_shared(k), bytes);
}

// CTAs of `kernel`, `threads` threads and `smem` bytes of dynamic shared memory each,
// that one SM holds at once, by the runtime's occupancy calculation (registers,
// shared memory with the driver's reserve a CTA, the CTA and thread limits); 0 when a
// CTA cannot have that much shared memory. Asked once per kernel, device and size.
// The kernel's maximum is raised first: the calculation counts no CTA above it.
template <typename Kernel>
int resident_ctas(Kernel kernel, int threads, uint32_t smem) {
  const std::lock_guard<std::mutex> lock(kernel_shared_mutex());
  const void* k = reinterpret_cast<const void*>(kernel);
  KernelShared& shared = kernel_shared(k);
  if (smem > shared.limit) return 0;
  const auto known = shared.resident.find(smem);
  if (known != shared.resident.end()) return known->second;
  raise_shared_memory(k, shared, smem);
  int ctas = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, k, threads, smem));
  shared.resident.emplace(smem, ctas);
  return ctas;
}

// Calls f with std::integral_constant<uint8_t, mode>: compress_kernel is built per
// mode so that its per-value code has no mode branches. The op checked the mode.
template <typename F>
void dispatch_mode(int64_t mode, F&& f) {
  switch (mode) {
    case kFixed:
      f(std::integral_constant<uint8_t, kFixed>{});
      break;
    case kPlain:
      f(std::integral_constant<uint8_t, kPlain>{});
      break;
    default:
      f(std::integral_constant<uint8_t, kOutlier>{});
  }
}

// The shared memory of compress_kernel<Warps, Code, Mode> for args.n values a page:
// the page padded in shared memory (page_geometry) when there is room, not padded
// otherwise (bank conflicts are slower, not wrong). Sets args.geometry and
// args.page_smem_bytes; `aligned`: every source page is 16-byte aligned.
template <int Warps, uint8_t Code, uint8_t Mode>
uint32_t compress_shared_memory(CompressArgs& args, bool aligned) {
  const int elem = sizeof(typename CudaType<Code>::type);
  args.geometry = page_geometry(args.n, args.rows, elem, aligned);
  args.page_smem_bytes = staged_page_bytes(args.geometry, args.n, elem);
  if (shared_layout(args.page_smem_bytes, args.n).compress_total(Mode == kOutlier) >
      dynamic_shared_memory_limit(compress_kernel<Warps, Code, Mode>)) {
    args.geometry = page_geometry(args.n, args.rows, elem, false);
    args.page_smem_bytes = staged_page_bytes(args.geometry, args.n, elem);
  }
  return shared_layout(args.page_smem_bytes, args.n).compress_total(Mode == kOutlier);
}

// The shared memory of decompress_kernel<Warps, Code> for args.n values a page: room
// for a padded page when the kernel may have it, padding off otherwise. Sets
// args.page_smem_bytes and args.allow_padding; `aligned`: every destination page's
// rows start at 16-byte boundaries (page_views).
template <int Warps, uint8_t Code>
uint32_t decompress_shared_memory(DecompressArgs& args, bool aligned) {
  const int elem = sizeof(typename CudaType<Code>::type);
  args.allow_padding = aligned;
  args.page_smem_bytes = max_staged_page_bytes(args.n, elem);
  if (shared_layout(args.page_smem_bytes, args.n).decompress_total() >
      dynamic_shared_memory_limit(decompress_kernel<Warps, Code>)) {
    args.allow_padding = false;
    args.page_smem_bytes = round_up(args.n * elem, 16);
  }
  return shared_layout(args.page_smem_bytes, args.n).decompress_total();
}

// Whether CTAs of `warps` warps decompress pages of n values: the checksum pass hands
// each thread 16 width bytes, the block loop reads kDecodeAhead past the last.
bool decompress_holds(int warps, uint32_t n) {
  return shared_layout(0, n).num_blocks + kDecodeAhead <= 16u * 32u * static_cast<uint32_t>(warps);
}

}  // namespace

// What the ops (compress_cuda, decompress_cuda) need from the kernels of one CTA size:
// how many of its CTAs an SM holds for a launch's pages (0: that size cannot code
// them), and the launch. cta_ops<Warps> is defined in the translation unit that
// builds that size (KVCOMPRESS_CTA_WARPS).
struct CtaOps {
  int (*compress_ctas)(at::ScalarType dtype, int64_t mode, uint32_t n, uint32_t rows,
                       bool aligned);
  void (*compress)(at::TensorList sources, const at::Tensor& page_ids, double eb,
                   bool relative, int64_t mode, int64_t rows, at::Tensor& out,
                   at::Tensor& page_table);
  int (*decompress_ctas)(at::ScalarType dtype, uint32_t n, bool aligned);
  void (*decompress)(const at::Tensor& buf, const at::Tensor& page_table, at::TensorList dests,
                     const at::Tensor& dst_page_ids, at::Tensor& status);
};

template <int Warps>
const CtaOps& cta_ops();
template <>
const CtaOps& cta_ops<2>();
template <>
const CtaOps& cta_ops<4>();
template <>
const CtaOps& cta_ops<8>();

namespace {

// The parts of cta_ops<Warps>.
template <int Warps>
int compress_ctas(at::ScalarType dtype, int64_t mode, uint32_t n, uint32_t rows, bool aligned) {
  int ctas = 0;
  dispatch_kv_dtype(dtype, [&](auto tag) {
    constexpr uint8_t code = decltype(tag)::value;
    dispatch_mode(mode, [&](auto mode_tag) {
      constexpr uint8_t m = decltype(mode_tag)::value;
      CompressArgs probe;
      probe.n = n;
      probe.rows = rows;
      ctas = resident_ctas(compress_kernel<Warps, code, m>, kCtaThreads<Warps>,
                           compress_shared_memory<Warps, code, m>(probe, aligned));
    });
  });
  return ctas;
}

template <int Warps>
void compress_with(at::TensorList sources, const at::Tensor& page_ids, double eb, bool relative,
                   int64_t mode, int64_t rows, at::Tensor& out, at::Tensor& page_table) {
  const at::Tensor& src = sources[0];
  const int64_t num = page_ids.numel();
  const uint32_t n = static_cast<uint32_t>(src.size(1));
  // Look-back flags, then the ticket counter, zeroed on the stream before the launch.
  at::Tensor flags = at::zeros({num + 1}, src.options().dtype(at::kLong));
  CompressArgs args;
  bool aligned = false;
  args.src = page_views<const uint8_t*>(sources, &aligned);
  args.page_ids = page_ids.data_ptr<int64_t>();
  args.out = out.data_ptr<uint8_t>();
  args.table = page_table.data_ptr<int64_t>();
  args.flags = reinterpret_cast<unsigned long long*>(flags.data_ptr<int64_t>());
  args.ticket = reinterpret_cast<unsigned int*>(flags.data_ptr<int64_t>() + num);
  args.n = n;
  args.rows = static_cast<uint32_t>(rows);
  args.eb = eb;
  args.relative = relative;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_kv_dtype(src.scalar_type(), [&](auto tag) {
    constexpr uint8_t code = decltype(tag)::value;
    const int elem = sizeof(typename CudaType<code>::type);
    dispatch_mode(mode, [&](auto mode_tag) {
      constexpr uint8_t m = decltype(mode_tag)::value;
      const auto kernel = compress_kernel<Warps, code, m>;
      const uint32_t smem = compress_shared_memory<Warps, code, m>(args, aligned);
      prepare_shared_memory(kernel, smem, dynamic_shared_memory_limit(kernel), n, elem);
      int sms = 0;
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount,
                                            c10::cuda::current_device()));
      args.resident =
          static_cast<uint32_t>(resident_ctas(kernel, kCtaThreads<Warps>, smem) * sms);
      kernel<<<static_cast<unsigned>(num), kCtaThreads<Warps>, smem, stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

template <int Warps>
int decompress_ctas(at::ScalarType dtype, uint32_t n, bool aligned) {
  if (!decompress_holds(Warps, n)) return 0;
  int ctas = 0;
  dispatch_kv_dtype(dtype, [&](auto tag) {
    constexpr uint8_t code = decltype(tag)::value;
    DecompressArgs probe;
    probe.n = n;
    ctas = resident_ctas(decompress_kernel<Warps, code>, kCtaThreads<Warps>,
                         decompress_shared_memory<Warps, code>(probe, aligned));
  });
  return ctas;
}

template <int Warps>
void decompress_with(const at::Tensor& buf, const at::Tensor& page_table, at::TensorList dests,
                     const at::Tensor& dst_page_ids, at::Tensor& status) {
  const at::Tensor& dst = dests[0];
  const uint32_t n = static_cast<uint32_t>(dst.size(1));
  DecompressArgs args;
  bool aligned = false;
  args.buf = buf.data_ptr<uint8_t>();
  args.buf_size = buf.numel();
  args.table = page_table.data_ptr<int64_t>();
  args.table_cols = page_table.size(1);
  args.dst = page_views<uint8_t*>(dests, &aligned);
  args.dst_ids = dst_page_ids.data_ptr<int64_t>();
  args.status = status.data_ptr<int32_t>();
  args.n = n;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_kv_dtype(dst.scalar_type(), [&](auto tag) {
    constexpr uint8_t code = decltype(tag)::value;
    const int elem = sizeof(typename CudaType<code>::type);
    const auto kernel = decompress_kernel<Warps, code>;
    const uint32_t smem = decompress_shared_memory<Warps, code>(args, aligned);
    prepare_shared_memory(kernel, smem, dynamic_shared_memory_limit(kernel), n, elem);
    TORCH_CHECK_VALUE(decompress_holds(Warps, n), "kvcompress: pages of " + std::to_string(n) +
                      " values are too large to decompress on the GPU");
    kernel<<<static_cast<unsigned>(dst_page_ids.numel()), kCtaThreads<Warps>, smem, stream>>>(
        args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

#ifdef KVCOMPRESS_CODEC_OPS
// The CTA sizes both kernels are built for, in warps, smallest first.
constexpr int kCtaWarps[] = {2, 4, 8};
constexpr int kCtaSizes = static_cast<int>(std::size(kCtaWarps));

// The kernels and launches of CTAs of `warps` warps, a size of kCtaWarps.
const CtaOps& cta_ops_for(int warps) {
  switch (warps) {
    case 2:
      return cta_ops<2>();
    case 4:
      return cta_ops<4>();
    default:
      return cta_ops<8>();
  }
}

// KVCOMPRESS_CODEC_WARPS (docs/tuning.md), read at every launch so that tests and
// benchmarks can change it between calls: unset, empty or 0 for the automatic CTA
// size (automatic_cta_warps), else the size of kCtaWarps to force.
int forced_cta_warps() {
  const char* value = std::getenv("KVCOMPRESS_CODEC_WARPS");
  const std::string text = value == nullptr ? "" : value;
  if (text.empty() || text == "0") return 0;
  int forced = 0;
  for (const int warps : kCtaWarps) {
    if (text == std::to_string(warps)) forced = warps;
  }
  TORCH_CHECK_VALUE(forced != 0,
                    "kvcompress: KVCOMPRESS_CODEC_WARPS must be 0 (automatic), 2, 4 or 8 "
                    "(warps a CTA of the codec kernels), not '" + text + "'");
  return forced;
}

// The most runs of 32 blocks the automatic CTA size gives each of its warps, per
// kernel, and the fewest warps its CTAs must keep resident on an SM. Timed on the H100
// with every size forced in turn (bf16 and fp32 pages of 4 to 64 KiB, rel 1e-2, every
// mode and layout; docs/codec-kernel-notes.md, "Timing the GPU alone"): bf16 pages of
// 32 KiB (16 runs) compress 5-8% faster in CTAs of 4 warps than of 8 and decompress
// 2-8% slower; fp32 pages of 24 and 32 KiB (6 and 8 runs), whose CTAs of 2 warps
// shared memory holds only 8 and 6 of an SM, run 3-12% faster in CTAs of 4.
constexpr int kCompressRunsPerWarp = 4;
constexpr int kDecompressRunsPerWarp = 3;
constexpr int kMinResidentWarps = 24;

// The automatic CTA size for pages of `num_blocks` blocks (docs/codec-kernel-notes.md,
// "CTA size per page size"): the smallest size that gives each warp at most
// `runs_per_warp` runs of 32 blocks (a lane a block) and of whose CTAs an SM holds at
// least kMinResidentWarps warps, else the largest that holds the launch's pages.
// Below 16 KiB a page's time is mostly per-page work (header, reductions, barriers,
// the look-back's wait) that a smaller CTA repeats in fewer warps while more pages are
// in flight to hide each page's waits; with more runs a warp, the page's blocks take
// the longer, and with fewer warps an SM, its loads wait uncovered. `ctas(ops)` is how
// many CTAs of a size an SM holds for the launch (CtaOps), asked of the sizes in turn.
template <typename Ctas>
int automatic_cta_warps(uint32_t num_blocks, int runs_per_warp, Ctas&& ctas) {
  const int runs = static_cast<int>((num_blocks + 31) / 32);
  for (const int warps : kCtaWarps) {
    if (runs > runs_per_warp * warps) continue;
    if (ctas(cta_ops_for(warps)) * warps >= kMinResidentWarps) return warps;
  }
  for (int i = kCtaSizes - 1; i >= 0; --i) {
    if (ctas(cta_ops_for(kCtaWarps[i])) > 0) return kCtaWarps[i];
  }
  // No size holds the page: the launch says why.
  return kCtaWarps[kCtaSizes - 1];
}
#endif

}  // namespace

template <>
const CtaOps& cta_ops<KVCOMPRESS_CTA_WARPS>() {
  constexpr int w = KVCOMPRESS_CTA_WARPS;
  static const CtaOps ops{&compress_ctas<w>, &compress_with<w>, &decompress_ctas<w>,
                          &decompress_with<w>};
  return ops;
}

#ifdef KVCOMPRESS_CODEC_OPS
void compress_cuda(at::TensorList sources, const at::Tensor& page_ids, double eb, bool relative,
                   int64_t mode, int64_t rows, at::Tensor& out, at::Tensor& page_table) {
  const at::Tensor& src = sources[0];
  const c10::cuda::CUDAGuard guard(src.device());
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0,
                    "kvcompress: out must start at a 16-byte aligned address");
  const uint32_t n = static_cast<uint32_t>(src.size(1));
  int warps = forced_cta_warps();
  if (warps == 0) {
    bool aligned = false;
    page_views<const uint8_t*>(sources, &aligned);
    warps = automatic_cta_warps(shared_layout(0, n).num_blocks, kCompressRunsPerWarp,
                                [&](const CtaOps& ops) {
      return ops.compress_ctas(src.scalar_type(), mode, n, static_cast<uint32_t>(rows), aligned);
    });
  }
  cta_ops_for(warps).compress(sources, page_ids, eb, relative, mode, rows, out, page_table);
}

void decompress_cuda(const at::Tensor& buf, const at::Tensor& page_table, at::TensorList dests,
                     const at::Tensor& dst_page_ids, at::Tensor& status) {
  const at::Tensor& dst = dests[0];
  const c10::cuda::CUDAGuard guard(dst.device());
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(buf.data_ptr()) % 16 == 0,
                    "kvcompress: buf must start at a 16-byte aligned address");
  const uint32_t n = static_cast<uint32_t>(dst.size(1));
  int warps = forced_cta_warps();
  // The shared-memory limit keeps pages far below what CTAs of 8 warps hold on every
  // GPU built for; smaller CTAs hold less (decompress_holds).
  TORCH_CHECK_VALUE(warps == 0 || decompress_holds(warps, n),
                    "kvcompress: KVCOMPRESS_CODEC_WARPS=" + std::to_string(warps) +
                    " is too small a CTA to decompress pages of " + std::to_string(n) +
                    " values; unset it (or set 0) for the automatic size");
  if (warps == 0) {
    bool aligned = false;
    page_views<uint8_t*>(dests, &aligned);
    warps = automatic_cta_warps(shared_layout(0, n).num_blocks, kDecompressRunsPerWarp,
                                [&](const CtaOps& ops) {
      return ops.decompress_ctas(dst.scalar_type(), n, aligned);
    });
  }
  cta_ops_for(warps).decompress(buf, page_table, dests, dst_page_ids, status);
}
#endif

}  // namespace kvcompress
