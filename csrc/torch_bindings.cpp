// Registers the codec as torch custom ops (torch.ops.kvcompress.*) and validates
// every argument before a kernel sees it, so bad input raises instead of reading
// out of bounds. Fake kernels for torch.compile live in vllm_kvcompress/_custom_ops.py.
#include <Python.h>
#include <torch/library.h>

#include <cmath>
#include <cstdio>
#include <string>

#include "ops.h"

namespace kvcompress {
namespace {

constexpr int64_t kMaxRows = 65535;

// Numbers in error messages are formatted here, not streamed: on the GPU host,
// streaming integers into c10's message builder crashed the process (the
// extension's toolchain and torch's disagree on iostream internals there).
std::string num(int64_t v) { return std::to_string(v); }
std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

std::string dims(at::IntArrayRef values) {
  std::string out = "(";
  for (size_t i = 0; i < values.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(values[i]);
  }
  return out + ")";
}

void check_pages(const at::Tensor& pages, const char* name) {
  TORCH_CHECK_VALUE(pages.dim() == 2, "kvcompress: ", name,
                    " must be a 2-D (num_pages, elems_per_page) view, got shape ", dims(pages.sizes()));
  dispatch_kv_dtype(pages.scalar_type(), [](auto) {});
  TORCH_CHECK_VALUE(pages.size(1) >= 1 && pages.size(1) <= (int64_t{1} << 28), "kvcompress: ",
                    name, " must have between 1 and 2^28 elements per page, got ", num(pages.size(1)));
  TORCH_CHECK_VALUE(pages.stride(1) == 1 && pages.stride(0) >= pages.size(1), "kvcompress: ",
                    name, " pages must each be contiguous (strides (>= elems_per_page, 1)), got ",
                    dims(pages.strides()));
}

// Views in one call must agree in everything a page id's arithmetic relies on.
void check_page_list(at::TensorList pages, const char* name) {
  TORCH_CHECK_VALUE(!pages.empty() && static_cast<int64_t>(pages.size()) <= kMaxSources,
                    "kvcompress: ", name, " must hold 1 to ", num(kMaxSources),
                    " page views, got ", num(static_cast<int64_t>(pages.size())));
  for (const at::Tensor& p : pages) {
    check_pages(p, name);
    TORCH_CHECK_VALUE(p.scalar_type() == pages[0].scalar_type() &&
                          p.device() == pages[0].device() && p.sizes() == pages[0].sizes() &&
                          p.strides() == pages[0].strides(),
                      "kvcompress: the ", name, " views must share dtype, device, shape and "
                      "strides; got shapes ", dims(pages[0].sizes()), " and ", dims(p.sizes()),
                      ", strides ", dims(pages[0].strides()), " and ", dims(p.strides()));
  }
}

void check_vector(const at::Tensor& t, at::ScalarType dtype, int64_t numel,
                  const at::Tensor& like, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "kvcompress: ", name, " must be ", dtype, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), "kvcompress: ", name, " must be contiguous");
  TORCH_CHECK_VALUE(numel < 0 || t.numel() == numel, "kvcompress: ", name, " must have ", num(numel),
                    " elements, got ", num(t.numel()));
  TORCH_CHECK_VALUE(t.device() == like.device(), "kvcompress: ", name, " is on ", t.device(),
                    " but the pages are on ", like.device());
}

int64_t record_bound(int64_t n, int64_t elem_bytes) {
  return round_up(kHeaderBytes + round_up(n * elem_bytes, 4), kRecordAlign);
}

void check_compress(at::TensorList sources, const at::Tensor& page_ids, double eb, int64_t mode,
                    int64_t rows, const at::Tensor& out, const at::Tensor& page_table) {
  check_page_list(sources, "src");
  const at::Tensor& src = sources[0];
  TORCH_CHECK_VALUE(page_ids.dim() == 1, "kvcompress: page_ids must be 1-D");
  check_vector(page_ids, at::kLong, -1, src, "page_ids");
  TORCH_CHECK_VALUE(std::isfinite(eb) && eb > 0.0, "kvcompress: the error bound must be finite and > 0, got ", num(eb));
  TORCH_CHECK_VALUE(mode >= kFixed && mode <= kOutlier,
                    "kvcompress: mode must be 0 (fixed), 1 (plain) or 2 (outlier), got ", num(mode));
  TORCH_CHECK_VALUE(rows >= 1 && rows <= kMaxRows && src.size(1) % rows == 0,
                    "kvcompress: rows must be in [1, 65535] and divide elems_per_page (",
                    num(src.size(1)), "), got ", num(rows));
  const int64_t bound = page_ids.numel() * record_bound(src.size(1), src.element_size());
  check_vector(out, at::kByte, -1, src, "out");
  TORCH_CHECK_VALUE(out.dim() == 1 && out.numel() >= bound, "kvcompress: out must be a 1-D uint8 "
                    "buffer of at least compress_bound() = ", num(bound), " bytes, got ", num(out.numel()));
  TORCH_CHECK_VALUE(out.numel() < (int64_t{1} << 62), "kvcompress: out is too large");
  check_vector(page_table, at::kLong, page_ids.numel() * 3, src, "page_table");
  TORCH_CHECK_VALUE(page_table.dim() == 2 && page_table.size(1) == 3,
                    "kvcompress: page_table must have shape (num_pages, 3)");
}

void check_decompress(const at::Tensor& buf, const at::Tensor& page_table, at::TensorList dests,
                      const at::Tensor& dst_page_ids, const at::Tensor& status) {
  check_page_list(dests, "dst");
  const at::Tensor& dst = dests[0];
  check_vector(buf, at::kByte, -1, dst, "buf");
  TORCH_CHECK_VALUE(buf.dim() == 1, "kvcompress: buf must be 1-D");
  TORCH_CHECK_VALUE(dst_page_ids.dim() == 1, "kvcompress: dst_page_ids must be 1-D");
  check_vector(dst_page_ids, at::kLong, -1, dst, "dst_page_ids");
  const int64_t num = dst_page_ids.numel();
  TORCH_CHECK_VALUE(page_table.dim() == 2 && page_table.size(0) == num && page_table.size(1) >= 2,
                    "kvcompress: page_table must have shape (", std::to_string(num), ", >= 2), got ",
                    dims(page_table.sizes()));
  check_vector(page_table, at::kLong, -1, dst, "page_table");
  check_vector(status, at::kInt, num, dst, "status");
}

void compress(at::TensorList src, const at::Tensor& page_ids, double eb, bool relative,
              int64_t mode, int64_t rows, at::Tensor& out, at::Tensor& page_table) {
  check_compress(src, page_ids, eb, mode, rows, out, page_table);
  if (page_ids.numel() == 0) return;
#ifdef KVCOMPRESS_WITH_CUDA
  if (src[0].is_cuda()) {
    return compress_cuda(src, page_ids, eb, relative, mode, rows, out, page_table);
  }
#endif
  TORCH_CHECK_VALUE(src[0].is_cpu(), "kvcompress: no kernels for device ", src[0].device());
  compress_cpu(src, page_ids, eb, relative, mode, rows, out, page_table);
}

void decompress(const at::Tensor& buf, const at::Tensor& page_table, at::TensorList dst,
                const at::Tensor& dst_page_ids, at::Tensor& status) {
  check_decompress(buf, page_table, dst, dst_page_ids, status);
  if (dst_page_ids.numel() == 0) return;
#ifdef KVCOMPRESS_WITH_CUDA
  if (dst[0].is_cuda()) return decompress_cuda(buf, page_table, dst, dst_page_ids, status);
#endif
  TORCH_CHECK_VALUE(dst[0].is_cpu(), "kvcompress: no kernels for device ", dst[0].device());
  decompress_cpu(buf, page_table, dst, dst_page_ids, status);
}

// The index tensors choose the device that runs the copy; a buffer on the other side
// must then be pinned host memory, which the GPU reaches through its mapping.
void check_copy_segments(const at::Tensor& src, const at::Tensor& src_offsets,
                         const at::Tensor& dst, const at::Tensor& dst_offsets,
                         const at::Tensor& sizes, const at::Tensor& status) {
  for (const auto& [t, name] : {std::pair{&src, "src"}, std::pair{&dst, "dst"}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kByte, "kvcompress: ", name,
                     " must be uint8, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() == 1 && t->is_contiguous(), "kvcompress: ", name,
                      " must be a contiguous 1-D buffer");
    TORCH_CHECK_VALUE(t->device() == sizes.device() || (sizes.is_cuda() && t->is_pinned()),
                      "kvcompress: ", name, " is on ", t->device(), " but the copy runs on ",
                      sizes.device(), "; a host buffer must be pinned for a GPU copy");
  }
  TORCH_CHECK_VALUE(sizes.dim() == 1, "kvcompress: sizes must be 1-D");
  check_vector(sizes, at::kLong, -1, sizes, "sizes");
  check_vector(src_offsets, at::kLong, sizes.numel(), sizes, "src_offsets");
  check_vector(dst_offsets, at::kLong, sizes.numel(), sizes, "dst_offsets");
  check_vector(status, at::kInt, sizes.numel(), sizes, "status");
  TORCH_CHECK_VALUE(sizes.numel() < (int64_t{1} << 31), "kvcompress: too many segments");
}

void copy_segments(const at::Tensor& src, const at::Tensor& src_offsets, at::Tensor& dst,
                   const at::Tensor& dst_offsets, const at::Tensor& sizes, at::Tensor& status) {
  check_copy_segments(src, src_offsets, dst, dst_offsets, sizes, status);
  if (sizes.numel() == 0) return;
#ifdef KVCOMPRESS_WITH_CUDA
  if (sizes.is_cuda()) return copy_segments_cuda(src, src_offsets, dst, dst_offsets, sizes, status);
#endif
  TORCH_CHECK_VALUE(sizes.is_cpu(), "kvcompress: no kernels for device ", sizes.device());
  copy_segments_cpu(src, src_offsets, dst, dst_offsets, sizes, status);
}

void check_pack_blocks(const at::Tensor& records, const at::Tensor& page_table,
                       const at::Tensor& room, const at::Tensor& dst,
                       const at::Tensor& dst_offsets, const at::Tensor& status,
                       const at::Tensor& checksums) {
  TORCH_CHECK_TYPE(records.scalar_type() == at::kByte && dst.scalar_type() == at::kByte,
                   "kvcompress: records and dst must be uint8, got ", records.scalar_type(),
                   " and ", dst.scalar_type());
  TORCH_CHECK_VALUE(records.dim() == 1 && records.is_contiguous() && dst.dim() == 1 &&
                    dst.is_contiguous(), "kvcompress: records and dst must be contiguous 1-D buffers");
  TORCH_CHECK_VALUE(dst.device() == records.device() || (records.is_cuda() && dst.is_pinned()),
                    "kvcompress: dst is on ", dst.device(), " but the records are on ",
                    records.device(), "; a host buffer must be pinned for a GPU copy");
  TORCH_CHECK_VALUE(page_table.dim() == 3 && page_table.size(1) >= 1 && page_table.size(2) == 3,
                    "kvcompress: page_table must have shape (blocks, pages >= 1, 3), got ",
                    dims(page_table.sizes()));
  check_vector(page_table, at::kLong, -1, records, "page_table");
  // Bounds that keep the kernels' sums of sizes and checksums inside int64.
  TORCH_CHECK_VALUE(records.numel() < (int64_t{1} << 56) && page_table.size(1) <= (1 << 24),
                    "kvcompress: records or pages per block too large");
  const int64_t blocks = page_table.size(0);
  TORCH_CHECK_VALUE(blocks < (int64_t{1} << 31), "kvcompress: too many blocks");
  check_vector(room, at::kLong, blocks, records, "room");
  check_vector(dst_offsets, at::kLong, blocks, records, "dst_offsets");
  check_vector(status, at::kInt, blocks, records, "status");
  check_vector(checksums, at::kLong, blocks, records, "checksums");
}

void pack_blocks(const at::Tensor& records, const at::Tensor& page_table, const at::Tensor& room,
                 at::Tensor& dst, const at::Tensor& dst_offsets, at::Tensor& status,
                 at::Tensor& checksums) {
  check_pack_blocks(records, page_table, room, dst, dst_offsets, status, checksums);
  if (page_table.size(0) == 0) return;
#ifdef KVCOMPRESS_WITH_CUDA
  if (records.is_cuda()) {
    return pack_blocks_cuda(records, page_table, room, dst, dst_offsets, status, checksums);
  }
#endif
  TORCH_CHECK_VALUE(records.is_cpu(), "kvcompress: no kernels for device ", records.device());
  pack_blocks_cpu(records, page_table, room, dst, dst_offsets, status, checksums);
}

}  // namespace
}  // namespace kvcompress

TORCH_LIBRARY(kvcompress, m) {
  m.def(
      "compress(Tensor[] src, Tensor page_ids, float eb, bool relative, int codec_mode, "
      "int rows, Tensor(a!) out, Tensor(b!) page_table) -> ()");
  m.def(
      "decompress(Tensor buf, Tensor page_table, Tensor(a!)[] dst, Tensor dst_page_ids, "
      "Tensor(b!) status) -> ()");
  m.def(
      "copy_segments(Tensor src, Tensor src_offsets, Tensor(a!) dst, Tensor dst_offsets, "
      "Tensor sizes, Tensor(b!) status) -> ()");
  m.def(
      "pack_blocks(Tensor records, Tensor page_table, Tensor room, Tensor(a!) dst, "
      "Tensor dst_offsets, Tensor(b!) status, Tensor(c!) checksums) -> ()");
}

TORCH_LIBRARY_IMPL(kvcompress, CPU, m) {
  m.impl("compress", &kvcompress::compress);
  m.impl("decompress", &kvcompress::decompress);
  m.impl("copy_segments", &kvcompress::copy_segments);
  m.impl("pack_blocks", &kvcompress::pack_blocks);
}

#ifdef KVCOMPRESS_WITH_CUDA
TORCH_LIBRARY_IMPL(kvcompress, CUDA, m) {
  m.impl("compress", &kvcompress::compress);
  m.impl("decompress", &kvcompress::decompress);
  m.impl("copy_segments", &kvcompress::copy_segments);
  m.impl("pack_blocks", &kvcompress::pack_blocks);
}
#endif

// The ops register themselves when the library loads; Python only needs a module to import.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, 0, nullptr};
  return PyModule_Create(&module);
}
