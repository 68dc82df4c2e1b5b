"""On a machine without a GPU (CI), vLLM cannot infer a platform from its CUDA
build; the CPU-side pieces under test (argument parsing, scheduler bookkeeping)
only need *a* platform, so give it the CPU one."""

import torch
import vllm.platforms

if not torch.cuda.is_available() and not vllm.platforms.current_platform.device_type:
    from vllm.platforms.cpu import CpuPlatform

    vllm.platforms._current_platform = CpuPlatform()
