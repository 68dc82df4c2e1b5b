"""The examples start, take their options, and the OpenAI client example talks to an
OpenAI-style endpoint as the README says (a stand-in server here; the GPU host runs
every example against vLLM on a real model, `run_gpu_host.sh examples`)."""

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("script", ["offline_compressed_offload.py",
                                    "multi_turn_long_prefix.py",
                                    "openai_client_request.py"])
def test_python_examples_show_their_options(script: str) -> None:
    result = subprocess.run([sys.executable, str(EXAMPLES / script), "--help"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_serve_example_asks_for_a_model() -> None:
    result = subprocess.run(["bash", str(EXAMPLES / "serve_compressed_offload.sh")],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert "usage:" in result.stderr


class _FakeOpenAI(BaseHTTPRequestHandler):
    """Answers /v1/models and /v1/chat/completions; ``status`` chooses success or a
    refusal such as vLLM sends for a prompt longer than the context."""

    status = 200
    requests: ClassVar[list[dict]] = []

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._reply(200, {"data": [{"id": "test-model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        if self.status != 200:
            self._reply(self.status, {"message": "This model's maximum context length is 1024"})
            return
        self._reply(200, {"choices": [{"message": {"content": "Station 37."}}],
                          "usage": {"prompt_tokens": 700, "completion_tokens": 3,
                                    "prompt_tokens_details": {"cached_tokens": 688}}})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_FakeOpenAI]]]:
    handler = type("Handler", (_FakeOpenAI,), {"requests": [], "status": 200})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", handler
    httpd.shutdown()
    thread.join()


def run_client(base_url: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / "openai_client_request.py"),
                           "--base-url", base_url, *extra],
                          capture_output=True, text=True, timeout=60, check=False)


def test_client_sends_the_shared_prefix_and_prints_usage(server) -> None:
    base_url, handler = server
    result = run_client(base_url, "--system-entries", "30")
    assert result.returncode == 0, result.stderr
    assert "Station 37." in result.stdout
    assert json.loads(result.stdout.split("\n", 1)[1])["prompt_tokens_details"] == {
        "cached_tokens": 688}
    (request,) = handler.requests
    assert request["model"] == "test-model"
    system = request["messages"][0]
    assert system["role"] == "system"
    assert system["content"].count("\nEntry ") == 30


def test_client_explains_a_refused_request(server) -> None:
    base_url, handler = server
    handler.status = 400
    result = run_client(base_url)
    assert result.returncode == 1
    assert "HTTP 400" in result.stderr and "maximum context length" in result.stderr
    assert "--system-entries" in result.stderr
    assert handler.requests[0]["messages"][0]["content"].count("\nEntry ") == 200
