// The codec kernels for CTAs of 4 warps: codec_cuda.cu built for that size, in a
// translation unit of its own (see KVCOMPRESS_CTA_WARPS there).
#define KVCOMPRESS_CTA_WARPS 4
#include "codec_cuda.cu"
