"""An LLM user for locust: streamed chat completions against an OpenAI-compatible server, with
time to first token and time per output token reported as their own locust entries.

Each user loops over the prompts of `PROMPTS_FILE` (JSONL, one `{"messages": [...]}` a line;
default `benchmarks/data/loadtest_prompts.jsonl`, written from the shipped corpus by
`python benchmarks/serve_bench.py --write-prompts PATH`) and sends each as a streamed, greedy chat
completion of `MAX_TOKENS` tokens (default 64), with vLLM's `ignore_eos` unless `IGNORE_EOS=0`
(some servers reject unknown fields). The model is `MODEL`, else the first id of GET /v1/models;
`OPENAI_API_KEY`, when set, is sent as the bearer token. Every request carries
`X-Clinicloop-Origin: service`, so a clinicloop server logs the load test as service traffic,
apart from patients' (the note is printed when the test starts).

Locust's table then has three entries, with the definitions of `benchmarks/serve_bench.py`:
- `POST /v1/chat/completions`: the whole request, to the last streamed token (locust would
  otherwise time a streamed response to its headers only);
- `METRIC ttft`: time to the first chunk carrying content;
- `METRIC tpot`: (e2e - TTFT) / (output tokens - 1), output tokens from the usage chunk (else the
  number of content chunks); not fired for one-token answers.
A request fails on an HTTP error, an error event in the stream, or a stream without content.

Run headless against `make serve` (writes var/loadtest/run_stats.csv and friends):
    make loadtest USERS=8 RUN_TIME=60s
or directly:
    locust -f benchmarks/locustfile.py --headless -u 8 -r 8 -t 60s \
        --host http://127.0.0.1:8000 --csv var/loadtest/run
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from locust import HttpUser, events, task
from requests import RequestException, Response
from serve_bench import StreamError, StreamTally, request_headers

from clinicloop.verifier.client import TRAFFIC_NOTE

PROMPTS_FILE = Path(os.environ.get(
    "PROMPTS_FILE", Path(__file__).resolve().parent / "data" / "loadtest_prompts.jsonl"))
MAX_TOKENS = int(os.environ.get("MAX_TOKENS", "64"))
IGNORE_EOS = os.environ.get("IGNORE_EOS", "1").strip().lower() not in ("0", "false", "no", "off")
API_KEY = os.environ.get("OPENAI_API_KEY")
CHAT_PATH = "/v1/chat/completions"

PROMPTS: list[list[dict[str, Any]]] = [
    json.loads(line)["messages"] for line in PROMPTS_FILE.read_text().splitlines() if line.strip()
]
# One shared cycle, so users spread over the prompts instead of all sending the first one.
_next_prompt = itertools.cycle(PROMPTS).__next__


@events.test_start.add_listener
def _say_where_traffic_goes(**_: Any) -> None:
    print(TRAFFIC_NOTE, file=sys.stderr)


def read_stream(resp: Response, start: float) -> tuple[float, float, int, int]:
    """Consume an SSE chat stream: (TTFT s, e2e s, output tokens, bytes read)."""
    tally = StreamTally(start)
    length = 0
    # chunk_size=None yields each HTTP chunk as it arrives, so the timestamps are live.
    for raw in resp.iter_lines(chunk_size=None):
        length += len(raw) + 1
        if not tally.feed(raw.decode(errors="replace")):
            break
    tally.check_content()
    return tally.ttft, tally.e2e, tally.output_tokens, length


class LLMUser(HttpUser):
    model: str | None = os.environ.get("MODEL")

    def on_start(self) -> None:
        self.client.headers.update(request_headers(API_KEY))
        if LLMUser.model is None:
            with self.client.get("/v1/models", name="/v1/models", catch_response=True) as resp:
                if resp.ok:
                    LLMUser.model = resp.json()["data"][0]["id"]

    @task
    def chat(self) -> None:
        payload = {
            "model": self.model, "messages": _next_prompt(), "max_tokens": MAX_TOKENS,
            "temperature": 0.0, "seed": 0, "stream": True,
            "stream_options": {"include_usage": True},
            **({"ignore_eos": True} if IGNORE_EOS else {}),
        }
        start = time.perf_counter()
        with self.client.post(CHAT_PATH, json=payload, stream=True, catch_response=True,
                              name=CHAT_PATH) as resp:
            if not resp.ok:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:300]}")
                return
            try:
                ttft, e2e, tokens, length = read_stream(resp, start)
            except (StreamError, RequestException, ValueError) as exc:
                resp.failure(exc)
                return
            resp.request_meta["response_time"] = e2e * 1000
            resp.request_meta["response_length"] = length
        self._metric("ttft", ttft, tokens)
        if tokens > 1:
            self._metric("tpot", (e2e - ttft) / (tokens - 1), tokens)

    def _metric(self, name: str, seconds: float, tokens: int) -> None:
        self.environment.events.request.fire(
            request_type="METRIC", name=name, response_time=seconds * 1000,
            response_length=tokens, exception=None, context={},
        )
