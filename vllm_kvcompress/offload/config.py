"""Compression settings of the offloading connector, carried in
``kv_connector_extra_config`` so that the scheduler and every worker process
read the same values from vLLM's own config plumbing."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_kvcompress.codec import CodecConfig, CodecMode

ERROR_BOUND_KEY = "compression_error_bound"
RELATIVE_KEY = "compression_relative"
MODE_KEY = "compression_mode"
CPU_BYTES_KEY = "cpu_bytes_to_use"

# Chosen from the fidelity sweep (docs/fidelity.md, "Default bound"): the largest
# relative bound whose perplexity increase stays within 1% on our trained model, and
# the mode that packs its KV tightest (values along channels are not smooth enough
# for delta coding to pay).
DEFAULT_ERROR_BOUND = 3e-2
DEFAULT_MODE = "fixed"
MODE_NAMES = tuple(mode.name.lower() for mode in CodecMode)


@dataclass(frozen=True)
class CompressionConfig:
    """What the offloading connector promises about every reloaded KV value.

    ``error_bound`` is relative to each page's value range (``max - min``) when
    ``relative`` is true, so one setting suits layers whose values differ in
    scale; an absolute bound is for users who know their KV's scale.
    """

    cpu_bytes: int
    error_bound: float = DEFAULT_ERROR_BOUND
    relative: bool = True
    mode: str = DEFAULT_MODE

    def __post_init__(self) -> None:
        if not (isinstance(self.cpu_bytes, int) and self.cpu_bytes > 0):
            raise ValueError("compressed offloading needs a host arena: set "
                             f"--kv-offloading-size (GiB) > 0, got {self.cpu_bytes!r} bytes")
        if not (isinstance(self.error_bound, (int, float)) and math.isfinite(self.error_bound)
                and self.error_bound > 0):
            raise ValueError("--compression-error-bound must be a finite number > 0, "
                             f"got {self.error_bound!r}")
        if self.relative and self.error_bound >= 1:
            raise ValueError("a relative --compression-error-bound must be < 1 (it is a "
                             f"fraction of each page's value range), got {self.error_bound}")
        if self.mode not in MODE_NAMES:
            raise ValueError(f"--compression-mode must be one of {', '.join(MODE_NAMES)}, "
                             f"got {self.mode!r}")

    @property
    def codec(self) -> CodecConfig:
        return CodecConfig(error_bound=float(self.error_bound), relative=self.relative,
                           mode=CodecMode[self.mode.upper()])

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any]) -> CompressionConfig:
        cpu_bytes = extra.get(CPU_BYTES_KEY)
        return cls(
            cpu_bytes=int(cpu_bytes) if cpu_bytes is not None else 0,
            error_bound=float(extra.get(ERROR_BOUND_KEY, DEFAULT_ERROR_BOUND)),
            relative=_as_bool(extra.get(RELATIVE_KEY, True), RELATIVE_KEY),
            mode=str(extra.get(MODE_KEY, DEFAULT_MODE)).lower(),
        )

    def to_extra_config(self) -> dict[str, Any]:
        return {
            CPU_BYTES_KEY: self.cpu_bytes,
            ERROR_BOUND_KEY: self.error_bound,
            RELATIVE_KEY: self.relative,
            MODE_KEY: self.mode,
        }


def _as_bool(value: Any, name: str) -> bool:
    # JSON configs (--kv-transfer-config) may carry booleans as strings.
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"{name} must be true or false, got {value!r}")
