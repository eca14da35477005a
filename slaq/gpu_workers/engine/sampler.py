"""Token sampling for a batch of rows, each with its own :class:`SamplingParams`.

Greedy (temperature 0), temperature, top-k, top-p and repetition penalty are applied to the
whole batch at once. Random draws use the exponential race (``argmax(p / E)``, ``E ~ Exp(1)``),
which samples exactly from ``p``; a seeded request draws its noise from its own
``torch.Generator``, so its tokens do not depend on what else shares the batch.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from slaq.gpu_workers.engine.config import SamplingParams

if TYPE_CHECKING:
    from slaq.gpu_workers.engine.sequence import Sequence


@dataclass(slots=True)
class SampleRequest:
    """One row of the logits: who it belongs to, how to sample it, and its token history
    (prompt + output, for the repetition penalty)."""

    request_id: str
    params: SamplingParams
    token_ids: Seq[int]

    @classmethod
    def of(cls, seq: Sequence) -> SampleRequest:
        """The row for ``seq``'s next token; its history only where a penalty reads it."""
        p = seq.params
        return cls(seq.request_id, p, seq.token_ids if p.repetition_penalty != 1.0 else ())


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    # Per row: (chosen token, logprob) first, then the top-n (token, logprob); None when off.
    logprobs: list[list[tuple[int, float]] | None]


class Sampler:
    """Holds one generator per seeded request; call :meth:`forget` when a request ends."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, request_id: str, seed: int) -> torch.Generator:
        gen = self._generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
            self._generators[request_id] = gen
        return gen

    def sample(self, logits: torch.Tensor, rows: list[SampleRequest],
               greedy_ids: torch.Tensor | None = None) -> SamplerOutput:
        """Pick one token per row of ``logits`` ``[B, V]``.

        ``greedy_ids`` (``[B]``), when the caller already has the argmax of these logits (a
        decode graph computes it on the device), saves the float copy and the argmax for a
        batch that is all greedy, unpenalised and without logprobs.
        """
        assert logits.shape[0] == len(rows)
        if greedy_ids is not None and all(r.params.argmax_only for r in rows):
            return SamplerOutput(token_ids=greedy_ids.tolist(), logprobs=[None] * len(rows))
        random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        raw = logits.float()
        logits = apply_repetition_penalty(raw, rows)
        token_ids = greedy_argmax(logits)
        if random_rows:
            token_ids = token_ids.clone()
            idx = torch.tensor(random_rows, device=logits.device)
            token_ids[idx] = self._sample_random(logits[idx], [rows[i] for i in random_rows])
        chosen = token_ids.tolist()
        return SamplerOutput(token_ids=chosen, logprobs=top_logprobs(raw, rows, chosen))

    def _sample_random(self, logits: torch.Tensor, rows: list[SampleRequest]) -> torch.Tensor:
        temps = torch.tensor([r.params.temperature for r in rows], device=logits.device)
        logits = apply_top_k_top_p(logits / temps[:, None], rows)
        probs = torch.softmax(logits, dim=-1)
        noise = torch.empty_like(probs)
        unseeded = []
        for i, r in enumerate(rows):
            if r.params.seed is None:
                unseeded.append(i)
            else:
                noise[i].exponential_(generator=self._generator(r.request_id, r.params.seed))
        if unseeded:
            idx = torch.tensor(unseeded, device=logits.device)
            noise[idx] = torch.empty((len(unseeded), probs.shape[1]),
                                     device=logits.device).exponential_()
        return (probs / noise).argmax(dim=-1)


# Chunk counts for the two-stage argmax, tried in order (the first that divides the vocab).
_ARGMAX_CHUNKS = (256, 128, 512, 64, 32)


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` (first index of the maximum) for ``[B, V]``, in two stages.

    One row of a 128k vocabulary is a single long reduction, which the GPU runs on one block
    (27 us on an H100 at batch 1). Splitting the row into chunks gives a maximum per chunk in
    parallel, then the first chunk holding the overall maximum; both stages keep the first
    index among equal values, so the result is exactly ``argmax``'s.
    """
    num_rows, vocab = logits.shape
    chunks = next((c for c in _ARGMAX_CHUNKS if vocab % c == 0 and vocab // c >= 32), None)
    if chunks is None:
        return logits.argmax(dim=-1)
    values, within = logits.view(num_rows, chunks, vocab // chunks).max(dim=-1)
    chunk = values.argmax(dim=-1, keepdim=True)
    return (chunk * (vocab // chunks) + within.gather(1, chunk)).squeeze(1)


def apply_repetition_penalty(logits: torch.Tensor, rows: list[SampleRequest]) -> torch.Tensor:
    """Divide positive / multiply negative logits of already-seen tokens (CTRL-style, as HF)."""
    penalised = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if not penalised:
        return logits
    width = max(len(rows[i].token_ids) for i in penalised)
    # Pad with the row's first token: duplicates compute and scatter the same value.
    ids = torch.tensor([list(h) + [h[0]] * (width - len(h))
                        for h in (rows[i].token_ids for i in penalised)],
                       dtype=torch.long, device=logits.device)
    penalty = torch.tensor([rows[i].params.repetition_penalty for i in penalised],
                           device=logits.device)[:, None]
    row_idx = torch.tensor(penalised, device=logits.device)
    sub = logits[row_idx]
    seen = sub.gather(1, ids)
    sub.scatter_(1, ids, torch.where(seen > 0, seen / penalty, seen * penalty))
    logits = logits.clone()
    logits[row_idx] = sub
    return logits


def apply_top_k_top_p(logits: torch.Tensor, rows: list[SampleRequest]) -> torch.Tensor:
    """Mask everything outside each row's top-k and its top-p nucleus with -inf."""
    top_k = [r.params.top_k for r in rows]
    top_p = [r.params.top_p for r in rows]
    if all(k == 0 for k in top_k) and all(p >= 1.0 for p in top_p):
        return logits
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.tensor([k if k > 0 else vocab for k in top_k], device=logits.device)[:, None]
    drop = rank >= k
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    p = torch.tensor(top_p, device=logits.device)[:, None]
    drop = drop | (mass_before > p)
    drop[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def top_logprobs(raw: torch.Tensor, rows: list[SampleRequest],
                 chosen: list[int]) -> list[list[tuple[int, float]] | None]:
    """The model's logprob of each chosen token plus the row's top-n alternatives."""
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    out: list[list[tuple[int, float]] | None] = [None] * len(rows)
    if not wanted:
        return out
    idx = torch.tensor(wanted, device=raw.device)
    lp = torch.log_softmax(raw[idx], dim=-1)
    n_max = max(rows[i].params.logprobs or 0 for i in wanted)
    top_vals, top_ids = lp.topk(max(n_max, 1), dim=-1)
    chosen_lp = lp.gather(1, torch.tensor([[chosen[i]] for i in wanted], device=raw.device))
    top_vals, top_ids, chosen_lp = top_vals.tolist(), top_ids.tolist(), chosen_lp.tolist()
    for j, i in enumerate(wanted):
        n = rows[i].params.logprobs or 0
        entry = [(chosen[i], chosen_lp[j][0])]
        entry += list(zip(top_ids[j][:n], top_vals[j][:n], strict=True))
        out[i] = entry
    return out
