"""The hand-off reuse figure (slaq.bench.handoff) on a small chat and a small trace."""

from __future__ import annotations

import json

from slaq.bench.handoff import main, run_chat, run_mooncake


def test_chat_reuse_pulls_less_with_the_same_tokens():
    out = run_chat(conversations=3, turns=2, max_tokens=8, block_size=4)
    assert out["tokens_identical"]
    none, reuse, affine = out["no_reuse"], out["reuse"], out["reuse_affinity"]
    assert none["blocks_pulled"] == none["blocks_leased"] > 0
    assert affine["blocks_pulled"] <= reuse["blocks_pulled"] < none["blocks_pulled"]
    assert affine["bytes_pulled"] < none["bytes_pulled"]
    # First turns find at most the prompts' common opening; later turns their own history.
    first, later = affine["per_turn"]
    assert first["blocks_pulled"] >= first["blocks_leased"] - 1
    assert later["blocks_pulled"] < none["per_turn"][1]["blocks_pulled"] / 2


def test_trace_replay_counts_blocks_per_mode(tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    rows = []
    for turn in range(3):  # two conversations; each turn extends the previous prompt
        for conv in range(2):
            ids = [100 * conv + i for i in range(2 + 2 * turn)] + [1000 + 10 * turn + conv]
            rows.append({"timestamp": turn, "input_length": 512 * (len(ids) - 1) + 7,
                         "output_length": 10, "hash_ids": ids})
    trace.write_text("\n".join(json.dumps(r) for r in rows))
    out = run_mooncake(trace, num_workers=2, cache_blocks=64)
    assert out["requests"] == 6
    assert out["no_reuse"]["blocks_pulled"] == out["no_reuse"]["blocks_leased"] == 30
    # Affinity sends each conversation's later turns where its earlier turn is cached: only
    # the new full blocks and the partial one move.
    assert out["reuse_affinity"]["blocks_pulled"] == 6 + 2 * (3 + 3)
    assert main(["--skip-chat", "--trace", str(trace), "--workers", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["mooncake"]["requests"] == 6
