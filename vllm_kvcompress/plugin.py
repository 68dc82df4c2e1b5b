"""The ``vllm.general_plugins`` entry point: compression flags for vLLM.

vLLM loads general plugins before it builds its CLI parser, in every process.
:func:`register` then

* registers ``CompressedOffloadingConnector`` with vLLM's connector factory;
* adds a "KV compression" group to the engine arguments (so ``vllm serve --help``
  lists ``--enable-compression`` and friends);
* turns ``--kv-offloading-size N --enable-compression`` into the connector's
  ``kv_transfer_config`` when the engine arguments are read from the command line.

The offline ``LLM(...)`` constructor builds its engine arguments before any plugin
loads and rejects unknown keywords, so the offline path is
``LLM(model, **compressed_offload_kwargs(kv_offloading_size=16))``.
"""

from __future__ import annotations

import argparse
from typing import Any

from vllm_kvcompress.logger import init_logger
from vllm_kvcompress.offload.config import (
    DEFAULT_ERROR_BOUND,
    DEFAULT_MODE,
    MODE_NAMES,
    CompressionConfig,
)

logger = init_logger(__name__)

CONNECTOR_NAME = "CompressedOffloadingConnector"
CONNECTOR_MODULE = "vllm_kvcompress.offload.connector"
SPEC_NAME = "CompressedCPUOffloadingSpec"
SPEC_MODULE = "vllm_kvcompress.offload.spec"

_COMPRESSION_FLAGS = ("compression_error_bound", "compression_absolute", "compression_mode")


def register() -> None:
    """Entry point; safe to call more than once (vLLM may load plugins repeatedly)."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.engine.arg_utils import EngineArgs

    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)
    if getattr(EngineArgs, "_kvcompress_cli", False):
        return
    add_cli_args = EngineArgs.add_cli_args
    from_cli_args = EngineArgs.from_cli_args.__func__

    def add_cli_args_with_compression(parser: Any, *args: Any, **kwargs: Any) -> Any:
        parser = add_cli_args(parser, *args, **kwargs)
        add_compression_args(parser)
        return parser

    def from_cli_args_with_compression(cls: type, args: argparse.Namespace) -> Any:
        engine_args = from_cli_args(cls, args)
        apply_compression_args(engine_args, args)
        return engine_args

    EngineArgs.add_cli_args = staticmethod(add_cli_args_with_compression)
    EngineArgs.from_cli_args = classmethod(from_cli_args_with_compression)
    EngineArgs._kvcompress_cli = True


def add_compression_args(parser: argparse.ArgumentParser) -> None:
    if any(a.dest == "enable_compression" for a in parser._actions):
        return
    group = parser.add_argument_group(
        "KV compression",
        "Compress KV blocks offloaded to CPU memory (vllm-kvcompress). Needs "
        "--kv-offloading-size; every reloaded KV value is within the error bound.")
    group.add_argument(
        "--enable-compression", action="store_true", default=False,
        help="Store CPU-offloaded KV blocks compressed with an error-bounded GPU codec, "
        "so the --kv-offloading-size arena holds several times more tokens and reloads "
        "move fewer bytes over PCIe.")
    group.add_argument(
        "--compression-error-bound", type=float, default=None, metavar="EB",
        help="Largest error allowed on any reloaded KV value, as a fraction of each "
        "page's value range (max - min; a page is one layer's K or V of one block), or "
        f"in absolute units with --compression-absolute. Default: {DEFAULT_ERROR_BOUND}.")
    group.add_argument(
        "--compression-absolute", action="store_true", default=None,
        help="Read --compression-error-bound as an absolute bound, not a relative one.")
    group.add_argument(
        "--compression-mode", choices=MODE_NAMES, default=None,
        help="Prediction before bit-plane coding: 'fixed' (none), 'plain' (difference "
        "from the previous value) or 'outlier' (plain, keeping each block's first value "
        f"apart). Default: {DEFAULT_MODE}.")


def apply_compression_args(engine_args: Any, args: argparse.Namespace) -> None:
    """Rewrites ``engine_args`` for ``--enable-compression``; rejects flags that
    cannot work together with a message that says what to change."""
    if not getattr(args, "enable_compression", False):
        given = [f"--{f.replace('_', '-')}" for f in _COMPRESSION_FLAGS
                 if getattr(args, f, None) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --enable-compression")
        return
    if engine_args.kv_offloading_size is None:
        raise ValueError("--enable-compression needs --kv-offloading-size (GiB of CPU "
                         "memory for the compressed KV cache)")
    if engine_args.kv_offloading_backend != "native":
        raise ValueError("--enable-compression works with --kv-offloading-backend native, "
                         f"got {engine_args.kv_offloading_backend!r}")
    if engine_args.kv_transfer_config is not None:
        raise ValueError("--enable-compression configures the KV connector itself; drop "
                         "--kv-transfer-config or use one of them")
    error_bound = args.compression_error_bound
    engine_args.kv_transfer_config = compressed_offload_kwargs(
        kv_offloading_size=engine_args.kv_offloading_size,
        error_bound=DEFAULT_ERROR_BOUND if error_bound is None else error_bound,
        mode=args.compression_mode or DEFAULT_MODE,
        relative=not args.compression_absolute,
    )["kv_transfer_config"]
    # vLLM would otherwise install its own uncompressed offloading connector.
    engine_args.kv_offloading_size = None


def compressed_offload_kwargs(
    kv_offloading_size: float,
    error_bound: float = DEFAULT_ERROR_BOUND,
    mode: str = DEFAULT_MODE,
    relative: bool = True,
) -> dict[str, Any]:
    """Engine keyword arguments that turn on compressed CPU offloading.

    ``kv_offloading_size`` is the host arena in GiB (summed over TP ranks, as for
    vLLM's own ``kv_offloading_size``); use as ``LLM(model, **compressed_offload_kwargs(16))``.
    """
    from vllm.config import KVTransferConfig

    if not (isinstance(kv_offloading_size, (int, float)) and kv_offloading_size > 0):
        raise ValueError(f"kv_offloading_size must be > 0 GiB, got {kv_offloading_size!r}")
    compression = CompressionConfig(cpu_bytes=int(kv_offloading_size * (1 << 30)),
                                    error_bound=error_bound, relative=relative,
                                    mode=str(mode).lower())
    extra = {"spec_name": SPEC_NAME, "spec_module_path": SPEC_MODULE,
             **compression.to_extra_config()}
    return {"kv_transfer_config": KVTransferConfig(
        kv_connector=CONNECTOR_NAME,
        kv_connector_module_path=CONNECTOR_MODULE,
        kv_role="kv_both",
        kv_load_failure_policy="recompute",
        kv_connector_extra_config=extra,
    )}
