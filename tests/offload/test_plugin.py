"""The general plugin: flags in ``--help``, translation into the connector
config, clear errors for flags that cannot work, and the offline kwargs."""

import argparse
import sys
from importlib.metadata import entry_points

import pytest

from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm_kvcompress import compressed_offload_kwargs
from vllm_kvcompress.offload.config import CompressionConfig
from vllm_kvcompress.plugin import register


@pytest.fixture(scope="module")
def parser() -> FlexibleArgumentParser:
    register()
    return EngineArgs.add_cli_args(FlexibleArgumentParser(prog="vllm serve"))


def engine_args(parser: FlexibleArgumentParser, argv: list[str]) -> EngineArgs:
    return EngineArgs.from_cli_args(parser.parse_args(["--model", "m", *argv]))


def test_entry_point_is_installed() -> None:
    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("kvcompress") == "vllm_kvcompress.plugin:register"


def test_flags_are_in_help(parser: FlexibleArgumentParser) -> None:
    text = parser.format_help()
    for flag in ("--enable-compression", "--compression-error-bound",
                 "--compression-absolute", "--compression-mode", "KV compression"):
        assert flag in text


def test_register_twice_adds_flags_once() -> None:
    register()
    register()
    p = EngineArgs.add_cli_args(FlexibleArgumentParser())
    assert sum(a.dest == "enable_compression" for a in p._actions) == 1


def test_enable_compression_configures_the_connector(parser: FlexibleArgumentParser) -> None:
    args = engine_args(parser, ["--kv-offloading-size", "4", "--enable-compression",
                                "--compression-error-bound", "0.003",
                                "--compression-mode", "outlier"])
    assert args.kv_offloading_size is None, "vLLM must not add its own connector"
    cfg = args.kv_transfer_config
    assert cfg.kv_connector == "CompressedOffloadingConnector"
    assert cfg.kv_connector_module_path == "vllm_kvcompress.offload.connector"
    assert cfg.kv_load_failure_policy == "recompute"
    extra = cfg.kv_connector_extra_config
    assert extra["spec_name"] == "CompressedCPUOffloadingSpec"
    assert extra["spec_module_path"] == "vllm_kvcompress.offload.spec"
    assert extra["cpu_bytes_to_use"] == 4 << 30
    parsed = CompressionConfig.from_extra_config(extra)
    assert (parsed.error_bound, parsed.relative, parsed.mode) == (0.003, True, "outlier")


def test_async_engine_args_get_the_translation_too(parser: FlexibleArgumentParser) -> None:
    ns = parser.parse_args(["--model", "m", "--kv-offloading-size", "1",
                            "--enable-compression", "--compression-absolute"])
    args = AsyncEngineArgs.from_cli_args(ns)
    extra = args.kv_transfer_config.kv_connector_extra_config
    assert extra["compression_relative"] is False


def test_without_the_flag_nothing_changes(parser: FlexibleArgumentParser) -> None:
    args = engine_args(parser, ["--kv-offloading-size", "4"])
    assert args.kv_offloading_size == 4 and args.kv_transfer_config is None


@pytest.mark.parametrize("argv,match", [
    (["--enable-compression"], "needs --kv-offloading-size"),
    (["--compression-mode", "plain"], "only apply with --enable-compression"),
    (["--kv-offloading-size", "1", "--compression-error-bound", "0.1"],
     "only apply with --enable-compression"),
    (["--kv-offloading-size", "1", "--enable-compression", "--compression-error-bound", "0"],
     "finite number > 0"),
    (["--kv-offloading-size", "1", "--enable-compression", "--compression-error-bound", "2"],
     "must be < 1"),
    (["--kv-offloading-size", "1", "--enable-compression", "--kv-offloading-backend",
      "lmcache"], "native"),
    (["--kv-offloading-size", "1", "--enable-compression", "--kv-transfer-config",
      '{"kv_connector": "OffloadingConnector", "kv_role": "kv_both"}'], "--kv-transfer-config"),
])
def test_bad_combinations_are_clear_errors(parser: FlexibleArgumentParser, argv: list[str],
                                           match: str) -> None:
    with pytest.raises(ValueError, match=match):
        engine_args(parser, argv)


def test_bad_mode_is_rejected_by_the_parser(parser: FlexibleArgumentParser,
                                            capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--compression-mode", "zip"])
    assert "invalid choice" in capsys.readouterr().err


def test_offline_kwargs() -> None:
    kwargs = compressed_offload_kwargs(2, error_bound=0.05, mode="fixed", relative=False)
    extra = kwargs["kv_transfer_config"].kv_connector_extra_config
    assert (extra["cpu_bytes_to_use"], extra["compression_error_bound"],
            extra["compression_mode"], extra["compression_relative"]) == (
                2 << 30, 0.05, "fixed", False)
    with pytest.raises(ValueError, match="kv_offloading_size"):
        compressed_offload_kwargs(0)
    with pytest.raises(ValueError, match="compression-mode"):
        compressed_offload_kwargs(1, mode="gzip")


def test_serve_help_lists_the_flags(monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    from vllm.entrypoints.cli.main import main

    monkeypatch.setattr(sys, "argv", ["vllm", "serve", "--help=KV compression"])
    # The CLI sets this for its process; keep it from leaking into later tests,
    # where it would change how vLLM starts its engine.
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code in (0, None)
    assert "--enable-compression" in capsys.readouterr().out


def test_extra_config_booleans_may_be_strings() -> None:
    cfg = CompressionConfig.from_extra_config({"cpu_bytes_to_use": 64,
                                               "compression_relative": "false"})
    assert cfg.relative is False
    with pytest.raises(ValueError, match="true or false"):
        CompressionConfig.from_extra_config({"cpu_bytes_to_use": 64,
                                             "compression_relative": "maybe"})


def test_namespace_without_compression_flags_is_left_alone() -> None:
    register()
    ns = argparse.Namespace(model="m")
    assert EngineArgs.from_cli_args(ns).kv_transfer_config is None
