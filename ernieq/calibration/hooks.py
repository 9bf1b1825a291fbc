"""What a calibration pass records per decoder layer: hooks, and the stand-in for the experts module.

Shape legend: T tokens, E experts, A active experts per token, K input features,
H hidden size, I expert intermediate size.

Per decoder layer (see ``accumulate.py`` for the sums):

- every linear weight that is not a routed expert (attention, dense MLP, shared
  experts): a forward pre-hook feeds one site per distinct input (linear layers that
  read one tensor, q/k/v or gate/up, share a site: ``Adapter.shared_inputs``);
- every routed expert: while the layer runs, transformers' experts module is
  replaced by ``RecordingExperts``, the same eager loop over experts on the same
  parameters in the class's own layout, which hands each expert's rows x_e [T_e, H]
  to its gate/up site and its hidden state ``gate_fn(x_e W_gu^T)`` [T_e, I] (the
  class's own gate function: ``act(gate) * up`` or GPT-OSS's) to its down site;
- the router: a pre-hook computes the logits from the router's own weight; with the
  experts chosen they give counts, mean probabilities, entropy and top-k margin
  (``RouterStats``).

With ``all_experts``, *all-token* statistics are added in the same pass: every
expert's gate/up input is every token of the layer (one site per layer) and its
down input is its hidden state over all T tokens. These only feed
statistics; the layer's output is computed from the router's choice as usual,
so the hidden states carried to the next layer are the model's.
"""

from __future__ import annotations

import torch
from torch import nn

from ernieq.calibration.accumulate import InputAccumulator, RouterAccumulator, add_upper_gram
from ernieq.calibration.calibset import ExpertRow
from ernieq.calibration.layerwise import LayerwiseModel
from ernieq.errors import ErnieqError
from ernieq.model.adapters import TensorClass
from ernieq.model.expert_layout import ExpertLayout, gate_function
from ernieq.model.moe import ExpertGroup

ALL_TOKENS = "@all_tokens"


class CalibrationError(ErnieqError, ValueError):
    """Calibration input or a model the hooks cannot read."""


class Collector:
    """Accumulators for a whole run; one ``LayerHooks`` per decoder layer fills them."""

    def __init__(self, model: LayerwiseModel, all_experts: bool):
        self.model = model
        self.all_experts = all_experts
        self.acc: dict[str, InputAccumulator] = {}
        self.routes: dict[str, str] = {}
        self.all_token_routes: dict[str, str] = {}
        self.expert_of: dict[str, tuple[int, int]] = {}
        self.sites = {}
        self.experts: list[ExpertRow] = []
        self.routers = {}

    def accumulator(self, site: str, k: int) -> InputAccumulator:
        if site not in self.acc:
            self.acc[site] = InputAccumulator(k, self.model.device)
        return self.acc[site]

    def observe(self, i: int, layer: nn.Module) -> LayerHooks:
        return LayerHooks(self, i, layer)

    def finish_layer(self, sites: list[str]) -> None:
        """Normalise the layer's sums and drop its accumulators (memory follows one layer)."""
        for site in sites:
            stats = self.acc.pop(site).finish()
            if stats is not None:
                self.sites[site] = stats


class LayerHooks:
    """Context manager: hooks on one decoder layer while it runs over all calibration batches."""

    def __init__(self, collector: Collector, i: int, layer: nn.Module):
        self.c = collector
        self.i = i
        self.layer = layer
        self.handles = []  # hook handles
        self.restore = []  # callables that put swapped modules back
        self.layer_sites: list[str] = []
        self.lt = collector.model.layer_tensors(i)
        self.recorder: RecordingExperts | None = None
        self.routed: list[InputAccumulator] = []

    def __enter__(self) -> LayerHooks:
        try:
            self._hook_linears()
            if self.lt.experts is not None:
                self._hook_experts(self.lt.experts)
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._remove()
        if exc_type is None:
            self._finish()
        return False

    def _remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for undo in self.restore:
            undo()
        self.restore.clear()

    # -- ordinary linear layers -----------------------------------------------------------

    def _hook_linears(self) -> None:
        model = self.c.model
        prefix = model.layer_prefix(self.i) + "."
        ckpt_of = {}  # module path in the layer -> checkpoint weight name
        for info in self.lt.infos:  # every linear layer but a fused experts module's (RecordingExperts)
            if info.is_linear_weight and not (info.cls is TensorClass.ROUTED_EXPERT and model.adapter.fused_expert(info.name)):
                hf = model.adapter.to_hf_name(info.name)
                ckpt_of[hf[len(prefix) : -len(".weight")]] = info.name
        first_reader = {}  # module path -> the first linear (in the checkpoint) reading the same tensor
        for group in model.adapter.shared_inputs(self.i):
            readers = [p[len(prefix):] for p in group if p[len(prefix):] in ckpt_of]
            first_reader.update({r: readers[0] for r in readers})
        modules = dict(self.layer.named_modules())
        for path, name in ckpt_of.items():
            module = modules.get(path)
            if not isinstance(module, nn.Linear):
                raise CalibrationError(f"{name}: no nn.Linear at {prefix}{path} in the transformers model")
            site_path = first_reader.get(path, path)
            site = ckpt_of[site_path]
            self.c.routes[name] = site
            if site_path == path:
                self._add_site(site)
                acc = self.c.accumulator(site, module.in_features)
                self.handles.append(module.register_forward_pre_hook(_linear_hook(acc)))

    def _add_site(self, site: str) -> None:
        if site not in self.layer_sites:
            self.layer_sites.append(site)

    # -- routed experts and the router -------------------------------------------------------

    def _hook_experts(self, experts: ExpertGroup) -> None:
        model = self.c.model
        prefix = model.layer_prefix(self.i) + "."
        path = experts.container[len(prefix):]
        module = self.layer.get_submodule(path)
        layout = experts.layout
        e_count, inter, hidden = layout.num_experts, layout.inter, layout.hidden
        router_path = model.adapter.tree.routers.get(experts.container)
        logits = _RouterLogits()
        if router_path is not None:
            router = self.layer.get_submodule(router_path[len(prefix):])
            self.handles.append(router.register_forward_pre_hook(_router_hook(logits, router, e_count)))

        gate_up, down = [], []
        for e in range(e_count):
            g_site, d_site = experts.canonical_name(e, "gate_proj"), experts.canonical_name(e, "down_proj")
            for proj, site in (("gate_proj", g_site), ("up_proj", g_site), ("down_proj", d_site)):
                self.c.routes[experts.canonical_name(e, proj)] = site
                self.c.expert_of[experts.canonical_name(e, proj)] = (self.i, e)
            gate_up.append(self.c.accumulator(g_site, hidden))
            down.append(self.c.accumulator(d_site, inter))
            self._add_site(g_site)
            self._add_site(d_site)
        self.routed = gate_up
        all_input, all_down = None, None
        if self.c.all_experts:
            in_site = f"{experts.container}.gate_up_input{ALL_TOKENS}"
            all_input = self.c.accumulator(in_site, hidden)
            self._add_site(in_site)
            all_down = []
            for e in range(e_count):
                d_site = experts.canonical_name(e, "down_proj") + ALL_TOKENS
                all_down.append(self.c.accumulator(d_site, inter))
                self._add_site(d_site)
                for proj in ("gate_proj", "up_proj"):
                    self.c.all_token_routes[experts.canonical_name(e, proj)] = in_site
                self.c.all_token_routes[experts.canonical_name(e, "down_proj")] = d_site
        self.recorder = RecordingExperts(module, layout, gate_up, down, all_input, all_down, logits, self.i)
        parent, _, leaf = path.rpartition(".")
        owner = self.layer.get_submodule(parent) if parent else self.layer
        setattr(owner, leaf, self.recorder)
        self.restore.append(lambda: setattr(owner, leaf, module))

    def _finish(self) -> None:
        for site in self.layer_sites:  # each rank saw its share of the sequences: sum the shares
            self.c.acc[site].all_reduce()
        if self.recorder is not None and self.recorder.router_acc is not None:
            self.recorder.router_acc.all_reduce()
            stats = self.recorder.router_acc.finish()
            self.c.routers[self.i] = stats
            t, a = max(stats.tokens, 1), stats.top_k
            for e, acc in enumerate(self.routed):
                self.c.experts.append(
                    ExpertRow(self.i, e, acc.count, acc.count / t, acc.count / (t * a), stats.mean_prob[e])  # share = n / T
                )
        self.c.finish_layer(self.layer_sites)


def _linear_hook(acc: InputAccumulator):
    def hook(module, args):
        acc.add(args[0].detach())  # [..., K]

    return hook


class _RouterLogits:
    """The router's logits [T, E] of the batch being run, from its input (read by the experts' stand-in)."""

    value: torch.Tensor | None = None


def _router_hook(holder: _RouterLogits, router: nn.Module, num_experts: int):
    """Logits x W^T (+ b) from the router's own [E, H] weight (and [E] bias): whatever the router returns."""
    weight = next(p for p in router.parameters(recurse=False) if p.dim() == 2 and p.shape[0] == num_experts)
    bias = next((p for p in router.parameters(recurse=False) if p.dim() == 1 and p.shape[0] == num_experts), None)

    def hook(module, args):
        x = args[0].detach().reshape(-1, weight.shape[1]).float()  # [T, H]
        holder.value = torch.nn.functional.linear(x, weight.float(), bias.float() if bias is not None else None)

    return hook


class RecordingExperts(nn.Module):
    """Stands in for transformers' experts module while a layer is calibrated.

    It computes what the class's eager loop computes, with the same parameters, in the class's
    own layout (``ExpertLayout``): for every expert e, the rows routed to it x_e [T_e, H], its
    gate_up output z_e (plus bias), the hidden state ``h_e = gate_fn(z_e)`` [T_e, I] by the class's
    own gate function, and ``sum_e (h_e W_d^T (+ b)) * weight``; it hands x_e and h_e to the
    accumulators on the way, so no expert's hidden state is computed twice. With all-token
    accumulators it computes ``h`` over all T tokens and uses the routed rows for the output.
    The router's logits of the batch (``_RouterLogits``) and the experts chosen feed the
    router statistics.

    An expert picked by more than half of the tokens (top_k > E / 2 makes that the
    rule) gets its gate Hessian as ``X^T X - X_r^T X_r`` (X_r: the rows not routed
    to it), from one ``X^T X`` per batch: T + sum_e min(T_e, T - T_e) rows of
    work instead of sum_e T_e.
    """

    def __init__(self, inner: nn.Module, layout: ExpertLayout, gate_up, down, all_input, all_down,
                 logits: _RouterLogits, layer: int):
        super().__init__()
        self.inner, self.layout = inner, layout
        self.gate_fn = gate_function(inner)
        self.gate_up, self.down = gate_up, down  # routed accumulators per expert
        self.all_input, self.all_down = all_input, all_down  # all-token ones, or None
        self.logits, self.layer = logits, layer
        self.router_acc: RouterAccumulator | None = None

    def _hidden(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """x [T, H] -> down_proj's input gate_fn(x W_gu^T (+ b)) [T, I] of expert e."""
        lay, p = self.layout, self.inner
        z = x @ lay.gate_up_nk(getattr(p, lay.gate_up))[e].T  # [T, 2I], the class's own column order
        if lay.gate_up_bias is not None:
            z = z + getattr(p, lay.gate_up_bias)[e]
        return self.gate_fn(z)

    def _output(self, h: torch.Tensor, e: int) -> torch.Tensor:
        lay, p = self.layout, self.inner
        y = h @ lay.down_nk(getattr(p, lay.down))[e].T  # [T, H]
        return y + getattr(p, lay.down_bias)[e] if lay.down_bias is not None else y

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """hidden_states [T, H]; top_k_index, top_k_weights [T, A]. Returns [T, H]."""
        x = hidden_states
        e_count = self.layout.num_experts
        if self.logits.value is not None:
            if self.router_acc is None:
                self.router_acc = RouterAccumulator(self.layer, e_count, top_k_index.shape[-1], x.device)
            self.router_acc.add(self.logits.value, top_k_index.detach())  # [T, E], [T, A]
            self.logits.value = None
        out = torch.zeros_like(x)  # [T, H]
        counts = torch.bincount(top_k_index.flatten(), minlength=e_count)  # [E]
        complement = counts > x.shape[0] // 2  # [E]: cheaper as X^T X - X_r^T X_r
        gram = None
        if self.all_input is not None or bool(complement.any()):
            gram = add_upper_gram(torch.zeros(x.shape[1], x.shape[1], device=x.device), x.float())  # X^T X  [H, H]
        if self.all_input is not None:
            self.all_input.add(x, gram=gram)
        for e in range(e_count):
            routed = top_k_index == e  # [T, A]
            tok, slot = torch.where(routed)  # routed (token, slot) pairs  [T_e]
            if self.all_down is not None:
                h_all = self._hidden(x, e)  # [T, I]
                self.all_down[e].add(h_all)
                xe, he = x[tok], h_all[tok]
            elif tok.numel():
                xe = x[tok]  # [T_e, H]
                he = self._hidden(xe, e)  # [T_e, I]
            else:
                continue
            if complement[e]:
                rest = x[~routed.any(-1)]  # rows not routed to e  [T - T_e, H]
                self.gate_up[e].add(xe, gram=add_upper_gram(gram.clone(), rest.float(), alpha=-1))  # X^T X - X_r^T X_r
            else:
                self.gate_up[e].add(xe)
            self.down[e].add(he)
            y = self._output(he, e) * top_k_weights[tok, slot, None]  # routing weight applied  [T_e, H]
            out[tok] += y.to(out.dtype)  # a token picks an expert at most once: no repeated index
        return out
