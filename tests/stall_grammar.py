"""Does a hostile grammar stall the other clients? Side by side on one server (gemma3-270m):
an unconstrained streamed request's time to first token and inter-token latency, idle, and
while another client keeps sending ambiguous grammars.

    python tests/stall_grammar.py [--runs 6] [--tokens 32] [--threads 2]

``first``: twelve ``[a-z ]*`` in a row, ambiguous from the first token (the server's probe
refuses it on a worker thread, then 429 for that client); ``late``: the same after a literal longer than any token, so it
reaches the engine and fails there, on llama.cpp's work budget; ``json``: no hostile client, an
ordinary one asking for JSON by a schema's grammar, for comparison. Prints one JSON line per case:
median TTFT, median and p95 ITL (seconds), and how many hostile requests were answered.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fuzz_http import server  # noqa: E402

SEQ12 = " ".join(["[a-z ]*"] * 12)
HOSTILE = {"first": "root ::= " + SEQ12, "late": 'root ::= "the quick brown fox jumps over the lazy dog" ' + SEQ12,
           "json": "json"}  # json: an ordinary client with a JSON schema's grammar, for comparison
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


def timed_stream(port: int, tokens: int) -> tuple[float, list[float]]:
    """TTFT and the gaps between content chunks of one greedy streamed completion."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    body = {"prompt": "Once upon a time", "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    stamps = []
    for line in iter(r.readline, b""):
        if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
            stamps.append(time.perf_counter())
    c.close()
    return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])]


def hostile(port: int, grammar: str, stop: threading.Event, answers: list[int]) -> None:
    while not stop.is_set():
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        c.request("POST", "/v1/completions", body=json.dumps({"prompt": "Say:", "max_tokens": 32, "grammar": grammar}),
                  headers={"Content-Type": "application/json"})
        answers.append(c.getresponse().status)
        c.close()
        if answers[-1] == 429:  # refused at once: a flood of cheap refusals is a proxy's rate limit's business
            time.sleep(0.05)


def measure(port: int, runs: int, tokens: int) -> dict[str, float]:
    ttft, itl = [], []
    for _ in range(runs):
        t, gaps = timed_stream(port, tokens)
        ttft.append(t)
        itl += gaps
    itl.sort()
    return {"ttft_p50": round(statistics.median(ttft), 4), "ttft_max": round(max(ttft), 4),
            "itl_p50": round(statistics.median(itl), 4), "itl_mean": round(statistics.fmean(itl), 4),
            "itl_p95": round(itl[int(0.95 * (len(itl) - 1))], 4), "itl_max": round(itl[-1], 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default="idle,first,idle,late,idle,json")
    ap.add_argument("--server-args", default="", help="more flags for serve, e.g. '--grammar-penalty 0'")
    args = ap.parse_args()
    from llamabind.chat import json_schema_to_grammar
    from llamabind.models import default_model_path

    HOSTILE["json"] = json_schema_to_grammar(SCHEMA)

    extra = ["--slots", "4", "-t", str(args.threads), *args.server_args.split()]
    with server(str(default_model_path()), extra) as (port, _):
        timed_stream(port, 4)  # warm up
        for case in args.cases.split(","):
            stop, answers = threading.Event(), []
            th = None
            if case != "idle":
                th = threading.Thread(target=hostile, args=(port, HOSTILE[case], stop, answers), daemon=True)
                th.start()
                time.sleep(0.5)
            got = measure(port, args.runs, args.tokens)
            stop.set()
            if th is not None:
                th.join(120)
            print(json.dumps({"case": case, **got, "hostile_answers": dict(
                (str(s), answers.count(s)) for s in sorted(set(answers)))}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
