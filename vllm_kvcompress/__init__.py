"""vllm-kvcompress: compressed CPU KV-cache offloading for vLLM.

The codec lives in :mod:`vllm_kvcompress.codec`; importing this package does not
import vLLM, so the codec can be used (and tested) on its own.
"""

__version__ = "0.1.0"
