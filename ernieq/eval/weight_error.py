"""How far each decoded weight is from the baseline's, and what that does to the layer's output.

Per quantized module (a weight ``W [N, K]`` of the baseline and its decoded
``W_hat`` from the quantized checkpoint, ``dW = W_hat - W``):

- relative Frobenius error ``||dW||_F / ||W||_F``;
- SQNR in dB ``10 log10(||W||_F^2 / ||dW||_F^2)``;
- with calibration statistics (``H = X^T X / n`` of the module's inputs), the
  relative output error on the calibration activations
  ``||X dW^T||^2 / ||X W^T||^2 = tr(dW H dW^T) / tr(W H W^T)``, no raw activations needed.

Aggregates over a layer, an expert or a tensor class sum the energies first
(``sum ||dW||^2 / sum ||W||^2``), so a big module weighs more than a small one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch

from ernieq.codecs import decode
from ernieq.formats.native import base_name
from ernieq.formats.registry import QuantizedCheckpoint
from ernieq.model.adapters import adapter_for, stream_groups
from ernieq.model.checkpoint import CheckpointError, CheckpointReader
from ernieq.model.moe import linear_weights


@dataclass(frozen=True)
class ModuleError:
    """One quantized module. Energies: w2 = ||W||^2, e2 = ||dW||^2; with a Hessian,
    wh = tr(W H W^T) and eh = tr(dW H dW^T) (None without statistics)."""

    name: str
    cls: str
    layer: int | None
    expert: int | None
    proj: str | None
    codec: str
    weights: int
    w2: float
    e2: float
    wh: float | None = None
    eh: float | None = None

    def to_json(self) -> dict:
        return {**asdict(self), **error_figures(self.w2, self.e2, self.wh, self.eh)}


def sqnr_db(w2: float, e2: float) -> float | None:
    """10 log10(||W||^2 / ||dW||^2); None (JSON null) for an exact reconstruction or an all-zero weight."""
    return None if e2 == 0 or w2 == 0 else 10.0 * math.log10(w2 / e2)


def error_figures(w2: float, e2: float, wh: float | None = None, eh: float | None = None) -> dict:
    """rel_fro = sqrt(e2 / w2), sqnr_db, and output_rel_err = eh / wh when a Hessian was given."""
    return {
        "rel_fro": math.sqrt(e2 / w2) if w2 > 0 else 0.0,
        "sqnr_db": sqnr_db(w2, e2),
        "output_rel_err": (eh / wh if wh else 0.0) if wh is not None else None,
    }


def baseline_linear_weights(reader: CheckpointReader) -> Iterator[tuple[str, object, torch.Tensor]]:
    """(name, TensorInfo, W [N, K]) of every linear weight; routed experts under their per-expert names."""
    adapter = adapter_for(reader.config, str(reader.path / "config.json"))
    for group, tensors in stream_groups(reader, adapter):
        yield from linear_weights(group.tensors, tensors, adapter)


def module_error(name: str, info, codec: str, w: torch.Tensor, w_hat: torch.Tensor,
                 hessian: torch.Tensor | None) -> ModuleError:
    """w, w_hat: [N, K]; hessian: [K, K] or None."""
    w = w.float()
    dw = w_hat.float() - w  # dW = W_hat - W
    wh = eh = None
    if hessian is not None:
        h = hessian.float()  # [K, K]; the products in float32, the sums in float64
        wh = float(((w @ h).double() * w.double()).sum())  # tr(W H W^T)
        eh = float(((dw @ h).double() * dw.double()).sum())  # tr(dW H dW^T)
    return ModuleError(name, info.cls.value, info.layer, info.expert, info.proj, codec, w.numel(),
                       float(w.double().square().sum()), float(dw.double().square().sum()), wh, eh)


def weight_errors(baseline: CheckpointReader, quantized: QuantizedCheckpoint,
                  hessian_of: Callable[[str], torch.Tensor | None] | None = None) -> list[ModuleError]:
    """One :class:`ModuleError` per quantized module of ``quantized``, against ``baseline``'s weights.

    hessian_of: weight name -> H [K, K] (or None) for the output error.
    """
    rows = []
    seen = set()
    for name, info, w in baseline_linear_weights(baseline):
        base = base_name(name)
        spec = quantized.modules.get(base)
        if spec is None:
            continue
        w_hat = decode(quantized.quantized(base))  # [N, K] float32; W R when stored turned by a rotation R
        rotation = quantized.rotation(base)
        if rotation is not None:
            w_hat = rotation.apply_t(w_hat)  # W_hat = (W R)_hat R^T, back in the baseline's input basis
        if tuple(w_hat.shape) != tuple(w.shape):
            raise CheckpointError(f"{quantized.path}: {base} decodes to {tuple(w_hat.shape)}, "
                                  f"the baseline's {name} is {tuple(w.shape)}: not the same model?")
        hessian = hessian_of(name) if hessian_of is not None else None
        rows.append(module_error(name, info, spec.codec, w, w_hat, hessian))
        seen.add(base)
    missing = sorted(set(quantized.modules) - seen)
    if missing:
        raise CheckpointError(f"{baseline.path}: no baseline weight for quantized module(s) {missing[:3]} "
                              f"({len(missing)} in all): not the model {quantized.path} was made from?")
    return rows


def aggregate(rows: list[ModuleError], key: Callable[[ModuleError], tuple]) -> list[dict]:
    """Rows grouped by ``key`` (a tuple of named fields), energies summed, figures per group."""
    groups: dict[tuple, list[ModuleError]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    out = []
    for k, rs in sorted(groups.items(), key=lambda kv: tuple((v is None, v) for _, v in kv[0])):
        with_h = [r for r in rs if r.wh is not None]
        w2, e2 = sum(r.w2 for r in rs), sum(r.e2 for r in rs)
        wh = sum(r.wh for r in with_h) if with_h else None
        eh = sum(r.eh for r in with_h) if with_h else None
        out.append({**dict(k), "modules": len(rs), "weights": sum(r.weights for r in rs),
                    "codecs": sorted({r.codec for r in rs}), **error_figures(w2, e2, wh, eh)})
    return out


def summarize_errors(rows: list[ModuleError]) -> dict:
    """The JSON section: every module, and aggregates per layer, per layer and class, per expert, per class."""
    experts = [r for r in rows if r.expert is not None]
    return {
        "modules": [r.to_json() for r in rows],
        "layers": aggregate(rows, lambda r: (("layer", r.layer),)),
        "layer_classes": aggregate(rows, lambda r: (("layer", r.layer), ("cls", r.cls))),
        "experts": aggregate(experts, lambda r: (("layer", r.layer), ("expert", r.expert))),
        "classes": aggregate(rows, lambda r: (("cls", r.cls),)),
        "output_error": any(r.wh is not None for r in rows),
    }
