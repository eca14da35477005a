"""KV moved per hand-off with and without decode-side prefix reuse, on multi-turn workloads.

``python -m slaq.bench.handoff [--trace PATH]`` prints JSON with two parts:

``chat``: a synthetic chat on the tiny model with real engines: one prefill engine, two decode
engines, ``conversations`` x ``turns`` hand-offs (turn N+1's prompt is turn N's prompt, its
answer and a new message; turns of all conversations interleave). Three modes: today's
(round-robin routing, every leased block pulled), ``reuse`` (round-robin, the decode engine
pins what it has cached and pulls the rest) and ``reuse_affinity`` (routing by the decode
engines' published prefix hashes, :mod:`slaq.platform.affinity`). Blocks and bytes come from
the pulled tensors; every mode must give the same greedy tokens.

``mooncake``: a replay of the Mooncake conversation trace's ``hash_ids`` (512-token blocks;
equal ids = equal prefixes) on decode-side block managers alone: each id is one "token" of
a block-size-1 :class:`BlockManager`, so the same pins, LRU and summaries run as in an engine.
Only full prompt blocks are cached (the trace does not say which ids the answers became), so
it counts reuse of earlier prompts only: a lower bound. Each request is freed before the next
arrives (no load), so the routing baseline is round-robin.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slaq.gpu_workers.engine.block_manager import PREFIX_SUMMARY_SIZE, BlockManager, block_hashes
from slaq.gpu_workers.engine.config import SamplingParams
from slaq.gpu_workers.engine.sequence import Sequence
from slaq.platform.affinity import choose_affine_worker
from slaq.platform.pressure import Heartbeat

MODES = ("no_reuse", "reuse", "reuse_affinity")
TRACE = Path(__file__).resolve().parents[3] / "shared/traces/mooncake/conversation_trace.jsonl"


def _route(mode: str, names: list[str], beats: Callable[[], list[Heartbeat]],
           hashes: list[int], num_blocks: int, n: int) -> str:
    if mode == "reuse_affinity":
        u = (n * 0.6180339887) % 1.0  # deterministic, evenly spread tie-breaks
        baseline = names[n % len(names)]
        got = choose_affine_worker({}, beats(), 0.0, 1e9, u, hashes, num_blocks,
                                   baseline=baseline)
        if got is not None:
            return got.worker
    return names[n % len(names)]  # equally loaded workers: what balancing by pressure does


def _totals(rows: list[dict[str, int]]) -> dict[str, Any]:
    leased = sum(r["leased"] for r in rows)
    pulled = sum(r["pulled"] for r in rows)
    out: dict[str, Any] = {"hand_offs": len(rows), "blocks_leased": leased,
                           "blocks_pulled": pulled,
                           "blocks_pulled_per_hand_off": round(pulled / max(1, len(rows)), 2),
                           "fraction_pulled": round(pulled / max(1, leased), 4)}
    if rows and "bytes" in rows[0]:
        out["bytes_pulled"] = sum(r["bytes"] for r in rows)
        out["bytes_per_hand_off"] = round(out["bytes_pulled"] / len(rows))
    return out


def run_chat(conversations: int = 5, turns: int = 3, max_tokens: int = 16,
             block_size: int = 16,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The synthetic chat on the tiny model (see the module doc); ``progress`` gets a line
    after each mode (the modes take seconds each on a CPU)."""
    from slaq.gpu_workers.engine.llm_engine import LLMEngine
    from slaq.gpu_workers.engine.testing import TINY_PROMPTS, engine_config, make_tiny_model

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model(Path(tmp) / "tiny", seed=0)
        out: dict[str, Any] = {"conversations": conversations, "turns": turns,
                               "block_size": block_size, "max_tokens": max_tokens}
        tokens_by_mode = {}
        for mode in MODES:
            def new() -> Any:
                return LLMEngine(engine_config(path, num_blocks=512, block_size=block_size))
            prefill, decodes = new(), {f"dec-{i}": new() for i in range(2)}
            tok = prefill.tokenizer
            prompts = [tok.encode(f"Conversation {c}. " + TINY_PROMPTS[c % 5] * 3)
                       for c in range(conversations)]
            rows: list[dict[str, int]] = []
            per_turn: list[list[dict[str, int]]] = [[] for _ in range(turns)]
            answers: list[list[int]] = []

            def beats(decodes: dict[str, Any] = decodes) -> list[Heartbeat]:
                return [Heartbeat(worker=name, role="decode", time=0.0,
                                  num_blocks_total=e.block_manager.num_blocks,
                                  num_blocks_used=e.block_manager.num_used_blocks,
                                  prefix_hashes=e.stats().prefix_hashes)
                        for name, e in decodes.items()]

            for turn in range(turns):
                for c in range(conversations):
                    rid = f"c{c}t{turn}"
                    prompt = prompts[c]
                    prefill.add_request(rid, prompt, params, prefill_only=True)
                    first = [o for o in _drain(prefill) if o.request_id == rid][0]
                    leased = prefill.leased_blocks(rid)
                    name = _route(mode, list(decodes), beats,
                                  block_hashes(prompt, block_size), len(leased), len(rows))
                    dec = decodes[name]
                    k = dec.reserve_prefix(rid, prompt) if mode != "no_reuse" else 0
                    kv = prefill.read_blocks(leased[k:]) if k < len(leased) else None
                    prefill.free_request(rid)
                    dec.add_prefilled_request(rid, prompt, first.new_token_ids[0], params, kv)
                    answer = first.new_token_ids + [t for o in _drain(dec) for t in
                                                    o.new_token_ids]
                    answers.append(answer)
                    row = {"leased": len(leased), "pulled": len(leased) - k,
                           "bytes": 0 if kv is None else kv.numel() * kv.element_size()}
                    rows.append(row)
                    per_turn[turn].append(row)
                    prompts[c] = prompt + answer + tok.encode(f" Next question {turn}:")
            tokens_by_mode[mode] = answers
            out[mode] = {**_totals(rows), "per_turn": [_totals(r) for r in per_turn]}
            if progress is not None:
                progress(f"chat {mode}: {out[mode]['blocks_pulled']} of "
                         f"{out[mode]['blocks_leased']} blocks pulled in {len(rows)} hand-offs")
            for e in (prefill, *decodes.values()):
                e.close()
        out["tokens_identical"] = all(t == tokens_by_mode["no_reuse"]
                                      for t in tokens_by_mode.values())
        return out


def _drain(engine: Any) -> list[Any]:
    outs: list[Any] = []
    while engine.has_unfinished():
        outs += engine.step()
    return outs


def load_mooncake(trace: Path, max_requests: int) -> list[tuple[list[int], int]]:
    """``(ids of the full 512-token blocks, number of blocks)`` per request, in trace order.

    A prompt's last block is usually partial: an engine does not cache it, and the next turn
    (where it is full, with other tokens) has another id there.
    """
    rows: list[tuple[list[int], int]] = []
    with open(trace) as f:
        for line in f:
            if len(rows) >= max_requests:
                break
            r = json.loads(line)
            ids = r["hash_ids"]
            rows.append((ids[: r["input_length"] // 512], len(ids)))
    return rows


def run_mooncake(trace: Path, max_requests: int = 4000, num_workers: int = 4,
                 cache_blocks: int = 2000, summary_size: int = PREFIX_SUMMARY_SIZE,
                 ) -> dict[str, Any]:
    """Replay the trace's hash ids on ``num_workers`` decode-side block managers of
    ``cache_blocks`` blocks (512 tokens each) per mode (see the module doc)."""
    rows_in = load_mooncake(trace, max_requests)
    out: dict[str, Any] = {"requests": len(rows_in), "decode_workers": num_workers,
                           "cache_blocks_per_worker": cache_blocks, "block_tokens": 512,
                           "summary_size": summary_size}
    params = SamplingParams(max_tokens=2)
    for mode in MODES:
        bms = {f"dec-{i}": BlockManager(cache_blocks, 1, summary_size=summary_size)
               for i in range(num_workers)}

        def beats(bms: dict[str, BlockManager] = bms) -> list[Heartbeat]:
            return [Heartbeat(worker=n, role="decode", time=0.0, num_blocks_total=b.num_blocks,
                              num_blocks_used=b.num_used_blocks, prefix_hashes=b.prefix_summary())
                    for n, b in bms.items()]

        rows: list[dict[str, int]] = []
        for i, (ids, num_blocks) in enumerate(rows_in):
            name = _route(mode, list(bms), beats, block_hashes(ids, 1), num_blocks, i)
            bm, rid = bms[name], f"r{i}"
            k = bm.pin_prefix(rid, ids) if mode != "no_reuse" else 0
            # The partial block and the first sampled token: ids no other request has.
            tokens = ids + [-(i + 1) * 10] * (num_blocks - len(ids))
            seq = Sequence(rid, tokens, params, output_token_ids=[-(i + 1) * 10 - 1])
            bm.allocate_prefilled(seq, max(1, len(ids)))
            bm.free(seq)  # finished: its full prompt blocks stay cached (LRU)
            rows.append({"leased": num_blocks, "pulled": num_blocks - k})
        out[mode] = _totals(rows)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slaq.bench.handoff", description=__doc__)
    p.add_argument("--conversations", type=int, default=5)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--trace", type=Path, default=TRACE)
    p.add_argument("--max-requests", type=int, default=4000)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--cache-blocks", type=int, default=2000)
    p.add_argument("--summary-size", type=int, default=PREFIX_SUMMARY_SIZE)
    p.add_argument("--skip-chat", action="store_true")
    args = p.parse_args(argv)
    result: dict[str, Any] = {}
    if not args.skip_chat:
        result["chat"] = run_chat(args.conversations, args.turns)
    if args.trace.exists():
        result["mooncake"] = run_mooncake(args.trace, args.max_requests, args.workers,
                                          args.cache_blocks, args.summary_size)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
