"""Loggers that print through vLLM's logging setup.

vLLM configures one logger, ``vllm`` (its format, ``VLLM_LOGGING_LEVEL``, its
stream), and stops propagation there. A logger named after this package would
have no handler at all, and Python drops the INFO lines of such a logger; ours are
placed under ``vllm`` so users see them beside vLLM's own, formatted the same way.
"""

from logging import Logger

from vllm.logger import init_logger as init_vllm_logger


def init_logger(name: str) -> Logger:
    """The logger for module ``name``, a child of vLLM's ``vllm`` logger."""
    return init_vllm_logger(f"vllm.{name}")
