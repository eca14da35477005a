"""Model implementations over the paged KV pool, chosen by the checkpoint's architecture."""

from __future__ import annotations

from torch import nn

from slaq.gpu_workers.engine.models.llama import LlamaForCausalLM, ModelConfig

# HF `architectures[0]` -> our class. Mistral-style checkpoints share the Llama layout.
MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
}


def model_class(config: ModelConfig) -> type[nn.Module]:
    """The class that implements ``config.architecture``; ValueError when unsupported."""
    try:
        return MODEL_REGISTRY[config.architecture]
    except KeyError:
        raise ValueError(f"unsupported architecture {config.architecture!r}; "
                         f"supported: {sorted(MODEL_REGISTRY)}") from None


__all__ = ["MODEL_REGISTRY", "LlamaForCausalLM", "ModelConfig", "model_class"]
