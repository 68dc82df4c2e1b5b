"""Our log lines go through vLLM's logger, so INFO lines are printed, not dropped."""

import logging

import pytest

from vllm_kvcompress.logger import init_logger


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def vllm_handler():
    vllm_logger = logging.getLogger("vllm")
    handler, level = _Collect(), vllm_logger.level
    vllm_logger.addHandler(handler)
    vllm_logger.setLevel(logging.INFO)
    yield handler
    vllm_logger.removeHandler(handler)
    vllm_logger.setLevel(level)


def test_info_reaches_vllm_handlers(vllm_handler: _Collect) -> None:
    init_logger("vllm_kvcompress.offload.spec").info("arena of %d GiB", 8)
    assert vllm_handler.messages == ["arena of 8 GiB"]


def test_every_module_logs_under_vllm() -> None:
    import vllm_kvcompress.offload.connector as connector
    import vllm_kvcompress.offload.manager as manager
    import vllm_kvcompress.plugin as plugin

    for module in (connector, manager, plugin):
        assert module.logger.name == f"vllm.{module.__name__}"
