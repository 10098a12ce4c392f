"""The ollama backend's child process: one non-streaming chat request to a local ollama server.

Run as ``python -m portdaddy.fleet.ollama --model M`` with the prompt on stdin, its only way in (spec/fleet.md, "The
prompt goes on stdin"; ``PD_PROMPT`` is not read); prints the reply. The server is ``OLLAMA_HOST`` (default
``http://localhost:11434``). Exit 1 with one line on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="portdaddy.fleet.ollama")
    parser.add_argument("--model", required=True)
    # Said by the fleet until stdin became the only way; still taken, and meaning nothing, because a daemon started
    # before that passes it to this module as it now is on disk until it is restarted.
    parser.add_argument("--prompt-stdin", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    prompt = sys.stdin.buffer.read().decode("utf-8", "replace")
    host = os.environ.get("OLLAMA_HOST", "http://localhost:11434").rstrip("/")
    if "://" not in host:
        host = f"http://{host}"
    body = {"model": args.model, "stream": False,
            "messages": [{"role": "user", "content": prompt}]}  # fmt: skip
    request = urllib.request.Request(
        f"{host}/api/chat", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request) as reply:
            answer = json.loads(reply.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"ollama at {host} failed: {exc}; is `ollama serve` running?", file=sys.stderr)
        return 1
    print(answer.get("message", {}).get("content", ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
