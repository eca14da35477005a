"""Time from `make up` on a fresh clone to the first answer, then TTFT/TPOT for 1 and 20 requests.

Usage: python scripts/first_answer.py [--repo PATH] [--port 8765]
Clones PATH (default: this checkout) into a temporary folder, runs `make up` there with a fresh
SLAQ_DATA_DIR (embedded PostgreSQL and Redis unless SLAQ_* URLs are set), waits for the printed
key, asks the capital of France, then measures streamed TTFT/TPOT for one request and for 20
concurrent ones. Prints JSON; stops the stack with Ctrl-C (SIGINT) at the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import openai


def stream_once(client: openai.OpenAI, content: str, tier: str) -> dict:
    t0 = time.perf_counter()
    ttft = None
    n = 0
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": content}],
        service_tier=tier, temperature=0, max_completion_tokens=64, stream=True,
        stream_options={"include_usage": True})
    text = ""
    for chunk in stream:
        if chunk.choices and ttft is None:
            ttft = time.perf_counter() - t0
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    e2e = time.perf_counter() - t0
    tpot = (e2e - ttft) / (n - 1) if n > 1 else None
    return {"ttft_ms": ttft * 1000, "tpot_ms": tpot * 1000 if tpot else None,
            "e2e_ms": e2e * 1000, "completion_tokens": n, "text": text}


def summary(rows: list[dict]) -> dict:
    out = {}
    for k in ("ttft_ms", "tpot_ms", "e2e_ms"):
        vals = sorted(r[k] for r in rows if r[k] is not None)
        out[k] = {"mean": round(statistics.fmean(vals), 1), "p50": round(vals[len(vals) // 2], 1),
                  "max": round(vals[-1], 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="slaq-fresh-"))
    subprocess.run(["git", "clone", "-q", args.repo, str(work / "slaq")], check=True)
    env = dict(os.environ, SLAQ_DATA_DIR=str(work / "data"), PYTHONUNBUFFERED="1")
    log_path = work / "up.log"
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["make", "up"], cwd=work / "slaq", env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    key = None
    while proc.poll() is None and time.monotonic() - t0 < 1800:
        text = log_path.read_text(errors="replace")
        m = re.search(r"dev API key: (\S+)", text)
        if m and "slaq is up" in text:
            key = m.group(1)
            break
        time.sleep(1)
    if key is None:
        raise SystemExit("make up did not come up:\n" + log_path.read_text()[-3000:])
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=key, max_retries=0,
                           timeout=600)
    first = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", temperature=0, max_completion_tokens=32,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    to_first_answer = time.monotonic() - t0
    one = stream_once(client, "What is the capital of France?", "priority")
    with cf.ThreadPoolExecutor(20) as pool:
        tiers = ["priority", "default", "flex", "auto"]
        many = list(pool.map(lambda i: stream_once(client, f"Count from {i} to {i + 10}.",
                                                   tiers[i % 4]), range(20)))
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    print(json.dumps({
        "make_up_to_first_answer_s": round(to_first_answer, 1),
        "first_answer": first.choices[0].message.content,
        "one_request": {k: v for k, v in one.items() if k != "text"},
        "twenty_concurrent": summary(many),
        "make_up_exit_code": proc.returncode,
    }, indent=2))


if __name__ == "__main__":
    main()
