"""How to divide a norm's output by a scale s [H] by changing its parameters, found by running it.

AWQ folds ``x / s`` into the norm that produces x. For ``out = x_hat * w (+ b)`` (RMSNorm,
LayerNorm) that is ``w / s`` (and ``b / s``); Gemma's RMSNorm computes ``x_hat * (1 + w)``,
so there it is ``w' = (1 + w) / s - 1``. :func:`probe_norm_fold` finds the offset (0 or 1 or
whatever the class adds) from the class's own forward on a small CPU copy, and checks that
the rule divides the output by s exactly; a norm where no rule does is left alone, with
the reason.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

_ROWS = 4


@dataclass(frozen=True)
class NormFold:
    """``weight' = (offset + weight) / s - offset`` and ``bias' = bias / s`` divide the output by s."""

    offset: float
    has_bias: bool

    def apply(self, weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor):
        """(weight', bias') for the output divided by s [H] (float32 math, the inputs' dtypes)."""
        w = ((self.offset + weight.float()) / s - self.offset).to(weight.dtype)
        return w, (bias.float() / s).to(bias.dtype) if bias is not None else None


def _run(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    probe = copy.deepcopy(module)
    probe._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        probe._parameters["bias"] = nn.Parameter(bias, requires_grad=False)
    with torch.no_grad():
        return probe(x)


def probe_norm_fold(module: nn.Module) -> NormFold | str:
    """The fold rule of norm ``module`` (meta or not), or the reason there is none."""
    names = sorted(n for n, _ in module.named_parameters(recurse=False))
    if names not in (["weight"], ["bias", "weight"]):
        return f"{type(module).__name__} holds {names}, not a weight (and bias) per feature"
    h = module.weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(_ROWS, h, generator=gen)
    zero = torch.zeros(h) if "bias" in names else None
    try:
        at0 = _run(module, x, torch.zeros(h), zero)  # offset * x_hat
        x_hat = _run(module, x, torch.ones(h), zero) - at0  # x_hat
    except (RuntimeError, TypeError, ValueError) as err:
        return f"{type(module).__name__} does not run on a CPU copy ({err})"
    big = x_hat.abs() > 1e-3
    offset = float((at0[big] / x_hat[big]).median()) if bool(big.any()) else 0.0
    fold = NormFold(round(offset, 6), zero is not None)
    w = torch.rand(h, generator=gen) + 0.5
    b = torch.randn(h, generator=gen) if zero is not None else None
    s = torch.rand(h, generator=gen) + 0.5
    want = _run(module, x, w, b) / s
    w2, b2 = fold.apply(w, b, s)
    if not torch.allclose(_run(module, x, w2, b2), want, rtol=1e-4, atol=1e-5):
        return f"{type(module).__name__}'s output is not (offset + weight) * x_hat (+ bias): no weight divides it by s"
    return fold
