// The codec kernels for CTAs of 2 warps: codec_cuda.cu built for that size, in a
// translation unit of its own (see KVCOMPRESS_CTA_WARPS there).
#define KVCOMPRESS_CTA_WARPS 2
#include "codec_cuda.cu"
