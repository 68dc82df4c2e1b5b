"""vllm-kvcompress: compressed CPU KV-cache offloading for vLLM.

The codec lives in :mod:`vllm_kvcompress.codec`; importing this package does not
import vLLM, so the codec can be used (and tested) on its own.
"""

from typing import Any

__version__ = "0.1.0"


def compressed_offload_kwargs(kv_offloading_size: float, **options: Any) -> dict[str, Any]:
    """Engine keyword arguments for compressed CPU offloading (imports vLLM); see
    :func:`vllm_kvcompress.plugin.compressed_offload_kwargs`."""
    from vllm_kvcompress.plugin import compressed_offload_kwargs as build

    return build(kv_offloading_size, **options)
