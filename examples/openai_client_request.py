"""One chat completion against a server started by serve_compressed_offload.sh.

Run (with the server up):
    python examples/openai_client_request.py [--base-url http://localhost:8000/v1] \
        [--system-entries 200]

The request carries a long system prompt, the kind of prefix that compressed
offloading keeps in host memory. The script prints the answer and the token
usage; with ``--enable-prompt-tokens-details`` on the server, usage includes
``prompt_tokens_details.cached_tokens``, the prompt tokens served from the
prefix cache (GPU or host). Run it twice and the second run reports the shared
system prompt as cached. The default prompt is about 4,000 tokens; lower
``--system-entries`` for a model with a shorter context. It uses only the
standard library; the ``openai`` package works the same way against the same
endpoint.
"""

import argparse
import json
import sys
import urllib.error
import urllib.request


def system_prompt(entries: int) -> str:
    """A station log of ``entries`` lines (about 20 tokens each): the shared prefix."""
    return "You answer questions about this station log.\n" + "\n".join(
        f"Entry {i}: station {37 * i % 1000} reports {(29 * i) % 50 - 12} degrees "
        f"and wind {(11 * i) % 80} km/h." for i in range(entries))


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        # The server says why (a prompt longer than --max-model-len, most often).
        sys.exit(f"the server refused the request (HTTP {error.code}): "
                 f"{error.read().decode(errors='replace')}\n"
                 "a prompt too long for the model takes a smaller --system-entries")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://localhost:8000/v1")
    parser.add_argument("--model", help="served model name (default: the server's first model)")
    parser.add_argument("--system-entries", type=int, default=200,
                        help="lines of the shared system prompt")
    args = parser.parse_args()

    model = args.model
    if model is None:
        with urllib.request.urlopen(f"{args.base_url}/models", timeout=30) as response:
            model = json.load(response)["data"][0]["id"]

    reply = post_json(f"{args.base_url}/chat/completions", {
        "model": model,
        "messages": [
            {"role": "system", "content": system_prompt(args.system_entries)},
            {"role": "user", "content": "Which station reports the strongest wind?"},
        ],
        "max_tokens": 64,
        "temperature": 0.0,
    })
    print(reply["choices"][0]["message"]["content"])
    print(json.dumps(reply["usage"], indent=2))


if __name__ == "__main__":
    main()
