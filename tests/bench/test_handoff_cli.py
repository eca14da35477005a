"""``slaq bench handoff``: registered under ``slaq bench``, JSON on stdout and in ``--out``,
progress on stderr; a small real run (tiny model, a hand-written trace)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from slaq.cli import main


def _trace(path: Path) -> Path:
    # Two conversations, three turns; each turn extends the previous prompt by two blocks.
    rows = []
    for turn in range(3):
        for conv in range(2):
            ids = [100 * conv + i for i in range(2 + 2 * turn)] + [1000 + 10 * turn + conv]
            rows.append({"timestamp": turn, "input_length": 512 * (len(ids) - 1) + 7,
                         "output_length": 10, "hash_ids": ids})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_slaq_bench_handoff_writes_json_and_reports_progress(tmp_path) -> None:
    out = tmp_path / "handoff.json"
    result = CliRunner().invoke(main, [
        "bench", "handoff", "--conversations", "2", "--turns", "2", "--max-tokens", "4",
        "--block-size", "4", "--trace", str(_trace(tmp_path / "t.jsonl")), "--workers", "2",
        "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert json.loads(result.stdout) == data  # stdout is the JSON alone: it can be piped

    chat = data["chat"]
    assert (chat["conversations"], chat["turns"], chat["block_size"]) == (2, 2, 4)
    assert chat["tokens_identical"]
    assert chat["no_reuse"]["hand_offs"] == 4
    assert chat["reuse"]["blocks_pulled"] < chat["no_reuse"]["blocks_pulled"]
    assert data["mooncake"]["requests"] == 6 and data["mooncake"]["decode_workers"] == 2
    assert data["mooncake"]["no_reuse"]["blocks_pulled"] == 30

    progress = result.stderr.splitlines()
    for mode in ("no_reuse", "reuse", "reuse_affinity"):
        assert any(line.startswith(f"[handoff] chat {mode}: ") for line in progress), progress
    assert any("chat done in" in line for line in progress)
    assert any("replaying up to 4000 requests" in line for line in progress)


def test_trace_only_run_skips_the_chat(tmp_path) -> None:
    result = CliRunner().invoke(main, ["bench", "handoff", "--skip-chat", "--trace",
                                       str(_trace(tmp_path / "t.jsonl")), "--workers", "3"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"mooncake"}
    assert data["mooncake"]["decode_workers"] == 3


def test_bad_options_are_refused(tmp_path) -> None:
    runner = CliRunner()
    missing = runner.invoke(main, ["bench", "handoff", "--skip-chat",
                                   "--trace", str(tmp_path / "none.jsonl")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    zero = runner.invoke(main, ["bench", "handoff", "--conversations", "0"])
    assert zero.exit_code == 2 and "--conversations" in zero.output
