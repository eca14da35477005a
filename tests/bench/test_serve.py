"""``slaq bench serve``: report maths on recorded results, the client against a scripted SSE
server on loopback (refusals, errors, cut streams, downgrades), and a live replay of a
compressed Azure slice against ``slaq up`` with a tiny model."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from slaq.bench.serve import (
    FINISHED,
    LOST,
    REFUSED,
    ReplayResult,
    RequestResult,
    ServeConfig,
    fit_lengths,
    prompt_token_ids,
    replay,
)
from slaq.bench.serve_cli import build_trace, parse_tier_mix, serve, serve_compare
from slaq.bench.serve_report import (
    build_report,
    format_comparison,
    format_table,
    load_results,
    meets_sla,
    percentile,
    write_report,
)
from slaq.platform.tiers import TierTable
from slaq.sim.traces import Trace, TraceRequest

# --- report maths on recorded results ------------------------------------------------------


def _done(i: int, tier: str, ttft: float, e2e: float, n_out: int, sent: float = 0.0,
          used: str | None = None) -> RequestResult:
    return RequestResult(i, tier, sent, 10, n_out, outcome=FINISHED, tier_used=used or tier,
                         sent_s=sent, ttft_s=ttft, e2e_s=e2e, num_output_tokens=n_out,
                         itl_s=[(e2e - ttft) / max(n_out - 1, 1)] * (n_out - 1))


def recorded() -> ReplayResult:
    # priority targets: TTFT 1000 ms, TPOT 100 ms; default 3000/200; flex 30000/500.
    res = [
        _done(0, "priority", 0.5, 1.4, 10, sent=0.0),  # TPOT 100 ms: meets (<=)
        _done(1, "priority", 1.2, 2.0, 5, sent=1.0),  # TTFT misses
        _done(2, "priority", 0.2, 3.2, 11, sent=2.0),  # TPOT 300 ms misses
        RequestResult(3, "priority", 3.0, 10, 5, outcome=LOST, sent_s=3.0, error="timeout"),
        _done(4, "default", 2.0, 2.0, 1, sent=4.0),  # one token: no TPOT; meets
        # downgraded to flex: judged by flex's targets, so a 5 s TTFT meets
        _done(5, "default", 5.0, 6.0, 3, sent=5.0, used="flex"),
        RequestResult(6, "flex", 6.0, 10, 5, outcome=REFUSED, sent_s=6.0, http_status=429,
                      error="HTTP 429: busy"),
        _done(7, "flex", 10.0, 20.0, 21, sent=7.0),  # TPOT 500 ms: meets
    ]
    return ReplayResult("tiny", 1_700_000_000.0, 10.0, res)


def test_report_counts_attainment_and_goodput() -> None:
    rep = build_report(recorded(), TierTable(), label="fifo")
    overall = rep["overall"]
    assert overall["sent"] == 8 == overall["finished"] + overall["refused"] + overall["lost"]
    assert (overall["finished"], overall["refused"], overall["lost"]) == (6, 1, 1)
    assert overall["downgraded"] == 1
    assert overall["met_sla"] == 4  # 0, 4, 5, 7
    assert overall["goodput"] == pytest.approx(0.4)
    assert overall["request_throughput"] == pytest.approx(0.6)
    assert overall["output_token_throughput"] == pytest.approx((10 + 5 + 11 + 1 + 3 + 21) / 10)
    pr = rep["tiers"]["priority"]
    assert (pr["sent"], pr["finished"], pr["lost"], pr["met_sla"]) == (4, 3, 1, 1)
    assert pr["sla_attainment"] == pytest.approx(1 / 4)
    assert pr["attainment_of_finished"] == pytest.approx(1 / 3)
    assert pr["ttft_attainment"] == pytest.approx(2 / 4)
    assert pr["tpot_attainment"] == pytest.approx(1 / 4)
    assert pr["targets"] == {"ttft_ms": 1000, "tpot_ms": 100}
    assert pr["ttft_ms"]["p50"] == pytest.approx(500.0)
    assert pr["ttft_ms"]["mean"] == pytest.approx((500 + 1200 + 200) / 3)
    assert rep["tiers"]["default"]["downgraded"] == 1
    assert rep["tiers"]["flex"]["refused"] == 1
    assert "batch" not in rep["tiers"]
    assert rep["label"] == "fifo" and rep["errors"] == {"timeout": 1, "HTTP 429": 1}
    assert rep["error_examples"]["HTTP 429"] == "HTTP 429: busy"
    json.dumps(rep, allow_nan=False)  # strict JSON: no NaN anywhere


def test_tpot_and_sla_follow_the_definitions() -> None:
    tiers = TierTable()
    r = _done(0, "priority", 0.5, 1.4, 10)
    assert r.tpot_s == pytest.approx(0.1)
    assert meets_sla(r, tiers)
    assert _done(1, "default", 0.1, 0.1, 1).tpot_s is None
    assert not meets_sla(RequestResult(2, "flex", 0.0, 5, 5, outcome=REFUSED), tiers)
    slower = _done(3, "priority", 0.5, 1.41, 10)
    assert not meets_sla(slower, tiers)


@pytest.mark.parametrize("q", [0, 10, 50, 90, 99, 100])
def test_percentile_matches_numpy(q: float) -> None:
    xs = [float(x) for x in np.random.default_rng(3).gamma(2.0, 50.0, size=37)]
    assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([], q) is None


def test_attainment_over_time_windows() -> None:
    rep = build_report(recorded(), TierTable())
    series = rep["attainment_over_time"]
    assert len(series["t_s"]) == 20 and series["window_s"] == pytest.approx(0.5)
    pr = series["tiers"]["priority"]
    # sent at 0, 1, 2, 3 s: windows 0, 2, 4, 6; only the first met its SLA
    assert [pr[k] for k in (0, 2, 4, 6)] == [1.0, 0.0, 0.0, 0.0]
    assert pr[1] is None and "batch" not in series["tiers"]


def test_report_files_roundtrip_and_plots(tmp_path: Path) -> None:
    rec = recorded()
    rep = write_report(rec, tmp_path, label="slaq", meta={"trace": {"name": "t"}})
    for key in ("requests", "ttft_cdf", "attainment"):
        assert Path(rep["files"][key]).stat().st_size > 0
    assert Path(rep["files"]["ttft_cdf"]).read_bytes()[:4] == b"\x89PNG"
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["trace"] == {"name": "t"} and set(on_disk["tiers"]) == {
        "priority", "default", "flex"}
    again = load_results(tmp_path / "requests.jsonl")
    assert build_report(again)["overall"] == build_report(rec)["overall"]
    table = format_table(rep)
    assert table.count("\n") == 2 + 3 and "| all | 8 | 6 | 1 | 1 | 1 |" in table


def test_comparison_puts_goodput_relative_to_the_first_run(tmp_path: Path) -> None:
    fifo = build_report(recorded(), label="fifo")
    better = recorded()
    # priority request 1 now meets TTFT (400 ms) and TPOT ((0.7 - 0.4) / 4 = 75 ms)
    better.results[1].ttft_s, better.results[1].e2e_s = 0.4, 0.7
    slaq = build_report(better, label="slaq")
    assert slaq["overall"]["goodput"] == pytest.approx(0.5)
    table = format_comparison([fifo, slaq])
    assert "| fifo | all |" in table and "1.00x" in table and "1.25x" in table
    paths = []
    for rep in (fifo, slaq):
        paths.append(tmp_path / f"{rep['label']}.json")
        paths[-1].write_text(json.dumps(rep))
    res = CliRunner().invoke(serve_compare, [str(p) for p in paths])
    assert res.exit_code == 0 and "| slaq | priority |" in res.output


# --- trace shaping and prompts -----------------------------------------------------------


def test_prompts_have_exact_lengths_and_keep_shared_prefixes() -> None:
    a = TraceRequest(0.0, 700, 5, hash_ids=(1, 2))
    b = TraceRequest(0.0, 600, 5, hash_ids=(1, 3))
    c = TraceRequest(0.0, 300, 5)
    ids_a, ids_b = prompt_token_ids(a, 0, (100, 500)), prompt_token_ids(b, 1, (100, 500))
    assert (len(ids_a), len(ids_b)) == (700, 600)
    assert ids_a[:512] == ids_b[:512] and ids_a[512:600] != ids_b[512:600]
    ids_c0, ids_c1 = prompt_token_ids(c, 0, (100, 500)), prompt_token_ids(c, 1, (100, 500))
    assert len(ids_c0) == 300 and ids_c0 != ids_c1
    assert ids_c0 == prompt_token_ids(c, 0, (100, 500))  # deterministic
    assert all(100 <= i < 500 for i in ids_a + ids_c0)


def test_fit_lengths_and_tier_mix() -> None:
    t = Trace("t", (TraceRequest(0.0, 2000, 900, hash_ids=(1, 2, 3, 4)),
                    TraceRequest(1.0, 100, 10)))
    fit = fit_lengths(t, max_input_tokens=600, max_output_tokens=64)
    assert [(r.num_prompt_tokens, r.num_output_tokens) for r in fit.requests] == [(600, 64),
                                                                                   (100, 10)]
    assert fit.requests[0].hash_ids == (1, 2)
    assert parse_tier_mix("priority=0.2,default=0.5,flex=0.3") == {
        "priority": 0.2, "default": 0.5, "flex": 0.3}
    assert parse_tier_mix(None) == pytest.approx(
        {"priority": 0.2, "default": 0.5, "flex": 0.15, "batch": 0.15})
    import click

    for bad in ("priority", "gold=1", "flex=-1", "flex=0"):
        with pytest.raises(click.BadParameter):
            parse_tier_mix(bad)


def test_build_trace_from_the_azure_slice() -> None:
    t = build_trace("azure", 0.0, 20.0, 4.0, 0.5, 256, 16, {"priority": 1.0}, 0, 12)
    assert len(t) == 12 and t.requests[0].arrival_s == 0.0
    assert t.duration_s < 20.0 / 4.0
    assert all(r.num_prompt_tokens <= 256 and r.num_output_tokens <= 16 for r in t.requests)
    assert {r.tier for r in t.requests} == {"priority"}


def test_config_refuses_remote_urls() -> None:
    with pytest.raises(ValueError, match="loopback"):
        ServeConfig(base_url="http://example.com:8000", api_key="k")
    ServeConfig(base_url="http://example.com:8000", api_key="k", allow_remote=True)
    ServeConfig(base_url="http://[::1]:8000", api_key="k")
    with pytest.raises(ValueError):
        ServeConfig(base_url="ftp://127.0.0.1", api_key="k")


# --- the client against a scripted SSE server on loopback --------------------------------


def _chunk(text: str, tier: str, finish: str | None = None) -> bytes:
    body = {"id": "cmpl-1", "object": "text_completion", "service_tier": tier,
            "choices": [{"index": 0, "text": text, "finish_reason": finish}], "usage": None}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _usage(n: int, tier: str) -> bytes:
    body = {"id": "cmpl-1", "object": "text_completion", "service_tier": tier, "choices": [],
            "usage": {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n,
                      "prompt_tokens_details": {"cached_tokens": 0}}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class ScriptedApi(BaseHTTPRequestHandler):
    """Answers by the request's ``max_tokens``: 1 → 429, 2 → error event, 3 → stream cut
    without [DONE], 4 → served as flex (downgrade), 5 → hangs, else a normal stream."""

    bodies: list[dict] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        payload = json.dumps({"object": "list", "data": [{"id": "scripted"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append(body)
        n, tier = body["max_tokens"], body["service_tier"]
        if n == 1:
            self.send_response(429)
            self.send_header("Retry-After", "1")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        if n == 5:
            threading.Event().wait(3)
            return
        if n == 2:
            self.wfile.write(b'data: {"error": {"message": "boom"}}\n\ndata: [DONE]\n\n')
            return
        used = "flex" if n == 4 else tier
        for _ in range(n):
            self.wfile.write(_chunk("x", used))
            self.wfile.flush()
        if n == 3:
            return
        self.wfile.write(_chunk("", used, "length") + _usage(n, used) + b"data: [DONE]\n\n")


@pytest.fixture()
def scripted_api() -> Iterator[str]:
    ScriptedApi.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedApi)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_client_classifies_every_outcome(scripted_api: str) -> None:
    outs = [1, 2, 3, 4, 5, 8]
    trace = Trace("s", tuple(TraceRequest(0.05 * i, 20 + i, n, tier="default")
                             for i, n in enumerate(outs)))
    cfg = ServeConfig(base_url=scripted_api, api_key="k", request_timeout_s=1.0,
                      drain_timeout_s=5.0)
    result = replay(trace, cfg)
    by_out = {r.num_output_tokens_asked: r for r in result.results}
    assert result.model == "scripted" and len(result.results) == len(outs)
    assert by_out[1].outcome == REFUSED and by_out[1].http_status == 429
    assert by_out[2].outcome == LOST and "boom" in by_out[2].error
    assert by_out[3].outcome == LOST and "[DONE]" in by_out[3].error
    assert by_out[4].outcome == FINISHED and by_out[4].downgraded
    assert by_out[5].outcome == LOST and "timeout" in by_out[5].error
    ok = by_out[8]
    assert ok.outcome == FINISHED and not ok.downgraded and ok.num_output_tokens == 8
    assert len(ok.itl_s) == 7 and 0 < ok.ttft_s <= ok.e2e_s
    sent = {b["max_tokens"]: b for b in ScriptedApi.bodies}
    assert len(sent[8]["prompt"]) == 20 + 5 and sent[8]["ignore_eos"] is True
    assert sent[8]["stream_options"] == {"include_usage": True} and sent[8]["model"] == "scripted"


def test_run_stops_by_itself_when_the_server_hangs(scripted_api: str) -> None:
    trace = Trace("s", tuple(TraceRequest(0.0, 4, 5) for _ in range(3)))
    cfg = ServeConfig(base_url=scripted_api, api_key="k", model="m", request_timeout_s=60,
                      drain_timeout_s=0.5)
    result = replay(trace, cfg)
    assert [r.outcome for r in result.results] == [LOST] * 3
    assert all("cancelled" in r.error for r in result.results)


# --- live: slaq up with a tiny model -----------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_replay_azure_slice_against_slaq_up(database_url, redis_url, tiny_model_path,
                                            tmp_path) -> None:
    try:
        from tests.e2e.conftest import start_stack
    except ImportError:  # the checkout is not on sys.path; pytest put tests/ there
        from e2e.conftest import start_stack

    stack = start_stack({"SLAQ_DATABASE_URL": database_url, "SLAQ_REDIS_URL": redis_url,
                         "SLAQ_BROKER_URL": redis_url, "SLAQ_MODEL": str(tiny_model_path)},
                        tmp_path / "stack", timeout=120)
    out = tmp_path / "report"
    try:
        res = CliRunner().invoke(serve, [
            "--base-url", stack.base_url, "--api-key", stack.api_key, "--trace", "azure",
            "--duration-s", "20", "--time-scale", "2", "--max-requests", "20",
            "--max-input-tokens", "256", "--max-output-tokens", "16", "--seed", "1",
            "--request-timeout-s", "60", "--drain-timeout-s", "60", "--out", str(out),
            "--policy-label", "slaq"])
    finally:
        code = stack.stop()
    assert res.exit_code == 0, (res.output, repr(res.exception), stack.log_path.read_text()[-3000:])
    assert code == 0
    rep = json.loads((out / "report.json").read_text())
    overall = rep["overall"]
    assert overall["sent"] == 20
    assert overall["sent"] == overall["finished"] + overall["refused"] + overall["lost"]
    assert overall["finished"] > 0, (rep["error_examples"], stack.log_path.read_text()[-3000:])
    assert set(rep["tiers"]) <= {"priority", "default", "flex", "batch"} and rep["tiers"]
    assert sum(t["sent"] for t in rep["tiers"].values()) == 20
    for t in rep["tiers"].values():
        assert t["sent"] == t["finished"] + t["refused"] + t["lost"]
    assert rep["label"] == "slaq"
    for key in ("ttft_cdf", "attainment"):
        assert Path(rep["files"][key]).read_bytes()[:4] == b"\x89PNG"
    lines = (out / "requests.jsonl").read_text().splitlines()
    assert len(lines) == 21
    done = [json.loads(x) for x in lines[1:] if json.loads(x)["outcome"] == FINISHED]
    assert all(d["num_output_tokens"] == d["num_output_tokens_asked"] for d in done)
