"""The submission service: a validated request becomes a ledger row and a prefill ticket.

Order matters and is the point of this module: everything that can refuse a request (model,
tier, prompt length) runs *before* the ledger insert, so refused requests leave no row; the
ticket is sent only *after* the commit, so a worker never claims a row that does not exist yet.

IO-light and framework-free: no Flask here. Refusals raise :class:`AdmissionError`, which the
web layer answers in OpenAI's error shape.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from slaq.gpu_workers.engine.config import SamplingParams
from slaq.platform.tiers import TierTable

if TYPE_CHECKING:
    from slaq.platform.decisions import AdmissionVerdict

log = logging.getLogger(__name__)

# service_tier values the online API accepts: OpenAI's, plus "batch" (a slaq extension, so
# benchmark and trace replays can send batch-tier work online; it fills only spare capacity).
ONLINE_SERVICE_TIERS: tuple[str, ...] = ("auto", "default", "flex", "priority", "fast", "scale",
                                         "batch")

# (request_id, attempt, tier, message priority or None for the tier's own) -> None
TicketSender = Callable[[str, int, str, int | None], None]


class AdmissionError(Exception):
    """A refusal, answered as ``{"error": {message, type, param, code}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s


@dataclass(slots=True)
class GenerationRequest:
    """A chat or text completion request, already type-checked by the web layer.

    Exactly one of ``messages`` (chat), ``prompt`` or ``prompt_token_ids`` (completion) is set.
    ``max_tokens=None`` means "as many as the context allows".
    """

    kind: str
    model: str
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    stream: bool = False
    include_usage: bool = False
    service_tier: str | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("chat", "completion"):
            raise ValueError(f"kind must be 'chat' or 'completion', got {self.kind!r}")
        given = [x is not None for x in (self.messages, self.prompt, self.prompt_token_ids)]
        if sum(given) != 1:
            raise ValueError("exactly one of messages, prompt, prompt_token_ids must be set")
        if (self.kind == "chat") != (self.messages is not None):
            raise ValueError("chat requests carry messages, completions a prompt")
        if self.service_tier is not None and self.service_tier not in ONLINE_SERVICE_TIERS:
            raise ValueError(f"unknown service_tier {self.service_tier!r}")

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos, repetition_penalty=self.repetition_penalty)


@dataclass(frozen=True, slots=True)
class TenantInfo:
    """What admission needs to know about the caller (detached from any DB session)."""

    id: Any
    name: str
    default_tier: str
    allowed_tiers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request that is in the ledger and has a ticket on its way."""

    request_id: str
    attempt: int
    kind: str
    model: str
    tier_asked: str
    tier: str  # the tier used (what the response reports)
    prompt_tokens: int
    max_tokens: int
    created: int  # Unix seconds
    deadline_s: float


class ServedModel:
    """The model this API serves: its public names, tokenizer and context length.

    ``model`` is a model-store name or a path; both it and the path's last component are
    accepted as the request's ``model``. The tokenizer loads on first use (thread-safe).
    """

    def __init__(self, model: str, models_dir: Path, max_model_len: int | None = None) -> None:
        if max_model_len is not None and max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        self.ref = model
        self.name = Path(model).name if ("/" in model or Path(model).is_dir()) else model
        self.aliases = frozenset({model, self.name})
        self.models_dir = Path(models_dir)
        self.max_model_len_cap = max_model_len
        self.created = int(time.time())
        self._lock = threading.Lock()
        self._encode_lock = threading.Lock()
        self._tokenizer: Any = None
        self._max_model_len: int | None = None
        self._vocab_size: int | None = None

    def matches(self, name: str) -> bool:
        return name in self.aliases

    def _load(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                from slaq.gpu_workers.engine.loader import load_tokenizer
                from slaq.gpu_workers.model_store import resolve_model

                try:
                    path = resolve_model(self.ref, self.models_dir)
                except (FileNotFoundError, ValueError) as exc:
                    raise AdmissionError(503, f"The model is not available: {exc}",
                                         type="server_error", code="model_unavailable") from exc
                config = json.loads((path / "config.json").read_text())
                context = int(config.get("max_position_embeddings") or 2048)
                if self.max_model_len_cap is not None:
                    context = min(context, self.max_model_len_cap)
                tokenizer = load_tokenizer(path)
                # The embedding table's size bounds valid ids, not the tokenizer's length.
                self._vocab_size = int(config.get("vocab_size") or len(tokenizer))
                self._max_model_len = context
                self._tokenizer = tokenizer
            return self._tokenizer

    @property
    def max_model_len(self) -> int:
        self._load()
        assert self._max_model_len is not None
        return self._max_model_len

    @property
    def vocab_size(self) -> int:
        self._load()
        assert self._vocab_size is not None
        return self._vocab_size

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        from slaq.gpu_workers.engine.loader import apply_chat_template

        tokenizer = self._load()
        # HF fast tokenizers may reset their truncation state per call, which fails with
        # "Already borrowed" when two threads do it at once; tokenising is quick, so serialise.
        with self._encode_lock:
            return list(apply_chat_template(tokenizer, messages))

    def encode_text(self, prompt: str) -> list[int]:
        tokenizer = self._load()
        with self._encode_lock:
            return list(tokenizer.encode(prompt, add_special_tokens=False))


@dataclass(slots=True)
class AdmissionService:
    """validate → ledger row → commit → ticket."""

    session_factory: sessionmaker[Session]
    model: ServedModel
    tiers: TierTable
    send_ticket: TicketSender
    # (tier, prompt tokens) -> the reprioritiser's verdict (slaq.platform.decisions.AdmissionCache.admit)
    admit: Callable[[str, int], AdmissionVerdict] | None = None
    # (tier, prompt tokens) -> the ticket's message priority within its queue
    # (slaq.platform.policy.ticket_priority under the policy's config); None: the tier's own.
    ticket_priority: Callable[[str, int], int] | None = None
    clock: Callable[[], float] = field(default=time.time)

    def apply_load_state(self, tier: str, num_prompt_tokens: int) -> str:
        """The tier to use under the reprioritiser's latest decision: the asked one, its
        downgrade, or a 429 when a refusable tier's token budget for this cycle is spent."""
        if self.admit is None:
            return tier
        verdict = self.admit(tier, num_prompt_tokens)
        if verdict.refused and self.tiers[tier].refusable:
            raise AdmissionError(
                429, f"Resource Unavailable: the '{tier}' tier is overloaded ({verdict.reason}); "
                     "retry later.", type="rate_limit_error", code="resource_unavailable",
                retry_after_s=float(verdict.retry_after_s))
        return verdict.tier

    def prompt_ids(self, req: GenerationRequest) -> list[int]:
        """Token ids of the prompt; refuses out-of-vocabulary ids and empty prompts."""
        if req.messages is not None:
            ids = self.model.encode_chat(req.messages)
        elif req.prompt is not None:
            ids = self.model.encode_text(req.prompt)
        else:
            ids = list(req.prompt_token_ids or ())
            vocab = self.model.vocab_size
            bad = next((i for i in ids if not 0 <= i < vocab), None)
            if bad is not None:
                raise AdmissionError(400, f"Token id {bad} is out of vocabulary (size {vocab}).",
                                     param="prompt", code="invalid_value")
        if not ids:
            param = "messages" if req.kind == "chat" else "prompt"
            raise AdmissionError(400, "The prompt is empty.", param=param, code="invalid_value")
        return ids

    def max_tokens(self, req: GenerationRequest, num_prompt_tokens: int) -> int:
        """The generation budget; refuses what does not fit the context window."""
        limit = self.model.max_model_len
        wanted = req.max_tokens if req.max_tokens is not None else limit - num_prompt_tokens
        if num_prompt_tokens + max(wanted, 1) > limit:
            asked = f"{num_prompt_tokens} in the prompt"
            if req.max_tokens is not None:
                asked += f" + {req.max_tokens} to generate"
            raise AdmissionError(
                400, f"This model's maximum context length is {limit} tokens; you requested "
                     f"{asked}. Shorten the prompt or lower max_tokens.",
                param="messages" if req.kind == "chat" else "prompt",
                code="context_length_exceeded")
        return wanted

    def resolve_tier(self, req: GenerationRequest, tenant: TenantInfo) -> str:
        try:
            tier = self.tiers.resolve(req.service_tier, tenant.default_tier)
        except ValueError as exc:
            raise AdmissionError(400, str(exc), param="service_tier",
                                 code="invalid_value") from exc
        if tier not in tenant.allowed_tiers:
            raise AdmissionError(
                403, f"service_tier '{tier}' is not allowed for this API key "
                     f"(allowed: {', '.join(tenant.allowed_tiers)}).",
                type="permission_error", param="service_tier", code="tier_not_allowed")
        return tier

    def submit(self, req: GenerationRequest, tenant: TenantInfo,
               client_request_id: str | None = None) -> Admitted:
        """Admit ``req`` for ``tenant``: refuse (AdmissionError) or record and ticket it."""
        received = self.clock()
        if not self.model.matches(req.model):
            raise AdmissionError(
                404, f"The model '{req.model}' does not exist or you do not have access to it.",
                param="model", code="model_not_found")
        tier = self.resolve_tier(req, tenant)
        ids = self.prompt_ids(req)
        max_tokens = self.max_tokens(req, len(ids))
        try:
            params = req.sampling_params(max_tokens)
        except ValueError as exc:  # the web layer checks ranges; this is the last guard
            raise AdmissionError(400, str(exc), code="invalid_value") from exc
        # Last, so that a request refused for bad input takes nothing from the tier's budget.
        tier_asked, tier = tier, self.apply_load_state(tier, len(ids))
        admitted = self._record(req, tenant, tier_asked, tier, ids, params, client_request_id,
                                received)
        priority = None if self.ticket_priority is None else self.ticket_priority(tier, len(ids))
        try:
            self.send_ticket(admitted.request_id, admitted.attempt, tier, priority)
        except Exception as exc:
            log.exception("could not send the prefill ticket for %s", admitted.request_id)
            self._fail(admitted, f"ticket not sent: {exc}")
            raise AdmissionError(503, "The queue is unavailable; retry shortly.",
                                 type="server_error", code="service_unavailable",
                                 retry_after_s=1.0) from exc
        return admitted

    def _record(self, req: GenerationRequest, tenant: TenantInfo, tier_asked: str, tier: str,
                ids: Sequence[int], params: SamplingParams, client_request_id: str | None,
                received: float) -> Admitted:
        from slaq.platform import ledger

        target = self.tiers[tier]
        received_at = datetime.fromtimestamp(received, UTC)
        request_id = ledger.new_request_id()
        with self.session_factory() as session:
            # enqueued_at is stamped here: the ticket leaves right after this commit, and a fast
            # worker could claim the row before a separate update landed.
            ledger.create_request(
                session, id=request_id, tenant_id=tenant.id, kind=req.kind,
                model=self.model.name, tier_asked=tier_asked, tier_used=tier,
                ttft_target_ms=target.ttft_ms, tpot_target_ms=target.tpot_ms,
                received_at=received_at, enqueued_at=datetime.fromtimestamp(self.clock(), UTC),
                deadline_at=received_at + timedelta(seconds=target.deadline_s),
                prompt_token_ids=list(ids), params=params.to_dict(), prompt_tokens=len(ids),
                client_request_id=client_request_id, user=req.user,
                request_metadata=req.metadata)
        return Admitted(request_id=request_id, attempt=1, kind=req.kind,
                        model=self.model.name, tier_asked=tier_asked, tier=tier,
                        prompt_tokens=len(ids), max_tokens=params.max_tokens,
                        created=int(received), deadline_s=target.deadline_s)

    def _fail(self, admitted: Admitted, reason: str) -> None:
        from slaq.platform import ledger

        try:
            with self.session_factory() as session:
                ledger.fail_request(session, admitted.request_id, admitted.attempt, reason)
        except Exception:
            log.exception("could not mark %s failed", admitted.request_id)
