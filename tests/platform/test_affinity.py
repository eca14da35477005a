"""Prefix-affinity routing (pure): which decode worker a hand-off goes to."""

from __future__ import annotations

import pytest

from slaq.gpu_workers.engine.block_manager import block_hashes
from slaq.platform.affinity import AffinityConfig, cached_depth, choose_affine_worker
from slaq.platform.pressure import Heartbeat

NOW = 1000.0
PROMPT = block_hashes(list(range(64)), 4)  # 16 blocks


def hb(name: str, used: int = 10, hashes: list[int] | None = None, role: str = "decode",
       age: float = 0.0, total: int = 100, reserved: int = 0) -> Heartbeat:
    return Heartbeat(worker=name, role=role, num_blocks_total=total, num_blocks_used=used,
                     num_blocks_reserved=reserved, prefix_hashes=hashes or [], time=NOW - age)


def choose(heartbeats, weights=None, u=0.0, prompt=PROMPT, num_blocks=16, exclude=(),
           baseline=None, config=None):
    got = choose_affine_worker(weights or {}, heartbeats, NOW, 2.0, u, prompt, num_blocks,
                               exclude, baseline, config or AffinityConfig(min_gain=0.0))
    return None if got is None else (got.worker, got.cached_blocks)


def test_cached_depth_is_the_deepest_published_prompt_hash() -> None:
    assert cached_depth(PROMPT, set()) == 0
    assert cached_depth(PROMPT, {PROMPT[0]}) == 1
    assert cached_depth(PROMPT, {PROMPT[3], PROMPT[11], 12345}) == 12
    assert cached_depth(PROMPT[:5], {PROMPT[11]}) == 0  # a longer conversation's block
    other = block_hashes([7] + list(range(1, 64)), 4)  # differs in the first token
    assert cached_depth(other, set(PROMPT)) == 0


def test_longest_cached_prefix_wins_over_lower_pressure() -> None:
    beats = [hb("a", used=5, hashes=[PROMPT[1]]), hb("b", used=20, hashes=[PROMPT[9]]),
             hb("c", used=0)]
    assert choose(beats) == ("b", 10)


def test_no_cached_prefix_or_no_prompt_leaves_the_choice_to_pressure() -> None:
    beats = [hb("a", hashes=[123]), hb("b")]
    assert choose(beats) is None
    assert choose([hb("a", hashes=[PROMPT[3]])], prompt=[]) is None
    assert choose([hb("a", hashes=[PROMPT[0]])], config=AffinityConfig(min_blocks=2)) is None


def test_dead_excluded_prefill_and_full_workers_are_never_chosen() -> None:
    deep = [PROMPT[15]]
    assert choose([hb("old", hashes=deep, age=5.0), hb("x", used=0)]) is None
    assert choose([hb("a", hashes=deep), hb("b", hashes=[PROMPT[2]])],
                  exclude=("a",)) == ("b", 3)
    assert choose([hb("p", hashes=deep, role="prefill")]) is None
    # Over max_pressure, or too far above the least pressed worker.
    assert choose([hb("full", used=95, hashes=deep)]) is None
    assert choose([hb("hot", used=50, hashes=deep), hb("cool", used=10)]) is None
    assert choose([hb("warm", used=25, hashes=deep), hb("cool", used=10)]) == ("warm", 16)
    # No room for the blocks that would still move (reserved counts as taken).
    assert choose([hb("tight", used=10, total=14, hashes=[PROMPT[9]])]) is None
    assert choose([hb("fits", used=10, total=16, hashes=[PROMPT[9]])]) == ("fits", 10)
    assert choose([hb("res", used=0, reserved=12, total=16, hashes=[PROMPT[9]])]) is None


def test_published_weights_limit_and_break_ties() -> None:
    beats = [hb("a", hashes=[PROMPT[7]]), hb("b", hashes=[PROMPT[7]]),
             hb("c", hashes=[PROMPT[12]])]
    # c holds more, but the reprioritiser routes nothing to it now.
    weights = {"a": 1.0, "b": 3.0, "c": 0.0}
    assert choose(beats, weights, u=0.1) == ("a", 8)
    assert choose(beats, weights, u=0.5) == ("b", 8)
    # Without weights a tie goes to the lower pressure, then at random (u) among equals.
    tie = [hb("y", used=12, hashes=[PROMPT[4]]), hb("x", used=12, hashes=[PROMPT[4]]),
           hb("z", used=11, hashes=[PROMPT[4]])]
    assert choose(tie) == ("z", 5)
    assert choose(tie[:2], u=0.2) == ("x", 5)
    assert choose(tie[:2], u=0.7) == ("y", 5)


def test_affinity_overrides_the_baseline_only_for_a_clear_gain() -> None:
    default = AffinityConfig()  # min_gain 0.25: 4 of the prompt's 16 blocks
    base = hb("base", hashes=[PROMPT[3]])
    assert choose([base, hb("b", hashes=[PROMPT[6]])], baseline="base", config=default) is None
    assert choose([base, hb("b", hashes=[PROMPT[7]])], baseline="base",
                  config=default) == ("b", 8)
    # A short prefix every worker holds (a system prompt) moves nothing anywhere else.
    shared = [hb(n, hashes=[PROMPT[0]]) for n in "xyz"]
    assert choose(shared, baseline="x", config=default) is None
    assert choose(shared, baseline=None, config=default) is None  # 1 block < 4
    # A baseline that is not a live decode worker counts as holding nothing.
    assert choose([hb("b", hashes=[PROMPT[5]])], baseline="gone", config=default) == ("b", 6)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        AffinityConfig(max_pressure=1.5)
    with pytest.raises(ValueError):
        AffinityConfig(pressure_slack=-0.1)
    with pytest.raises(ValueError):
        AffinityConfig(min_blocks=0)
    with pytest.raises(ValueError):
        AffinityConfig(min_gain=1.5)


def test_heartbeat_round_trips_the_prefix_hashes() -> None:
    beat = hb("a", hashes=PROMPT[:3])
    beat.num_handoff_blocks, beat.num_handoff_blocks_reused = 12, 5
    back = Heartbeat.from_mapping(beat.to_mapping())
    assert back.prefix_hashes == PROMPT[:3]
    assert (back.num_handoff_blocks, back.num_handoff_blocks_reused) == (12, 5)
    assert Heartbeat.from_mapping({"worker": "w", "role": "decode"}).prefix_hashes == []
