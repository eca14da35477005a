"""HF-style model directory -> our model, its config, tokenizer and EOS ids.

A directory holds ``config.json``, ``*.safetensors`` (HF parameter names), the tokenizer files
(``tokenizer.json`` …) and optionally ``generation_config.json`` and a chat template.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from slaq.gpu_workers.engine.models import ModelConfig, model_class

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}") from None


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """Parse ``config.json``; ValueError when the directory is not a model directory."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{model_dir} has no config.json (not an HF-style model directory)")
    return ModelConfig.from_hf(_read_json(path))


def iter_safetensors(model_dir: str | Path,
                     device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of every ``*.safetensors`` file in the directory, by HF name."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} has no *.safetensors files")
    for file in files:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name)


def load_model(model_dir: str | Path, model_config: ModelConfig, device: torch.device | str,
               dtype: torch.dtype) -> nn.Module:
    """Build the model without initialising it (meta device), then load the checkpoint."""
    cls = model_class(model_config)
    with torch.device("meta"):
        model = cls(model_config)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()  # after to_empty, which would otherwise untie shared parameters
    model.load_weights(iter_safetensors(model_dir, "cpu"))
    return model.eval().requires_grad_(False)


def load_tokenizer(model_dir: str | Path) -> Any:
    """The HF (fast) tokenizer saved with the model."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def eos_token_ids(model_dir: str | Path, tokenizer: Any,
                  model_config: ModelConfig | None = None) -> tuple[int, ...]:
    """EOS ids from the tokenizer, ``generation_config.json`` and ``config.json``, in that
    order (SmolLM2's chat template ends turns with ``<|im_end|>``, id 2)."""
    ids: list[int] = []
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen = _read_json(Path(model_dir) / "generation_config.json").get("eos_token_id")
    ids += gen if isinstance(gen, list) else ([] if gen is None else [gen])
    if model_config is not None:
        ids += list(model_config.eos_token_ids)
    return tuple(dict.fromkeys(int(i) for i in ids))


def apply_chat_template(tokenizer: Any, messages: Sequence[dict[str, Any]],
                        add_generation_prompt: bool = True) -> list[int]:
    """Chat messages -> prompt token ids, with the model's own chat template."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    return list(tokenizer.encode(text, add_special_tokens=False))
