"""How each dense MLP becomes a MoE layer: which neurons form which expert, and the router."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ernieq.demo.cluster import balanced_kmeans, refine_experts
from ernieq.demo.mlp_inputs import calibration_windows, mlp_inputs
from ernieq.demo.recipe import DemoRecipe
from ernieq.demo.router import expert_log_norms, ridge_solver, snap_to_bfloat16
from ernieq.demo.source import DenseSource
from ernieq.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass
class MoePlan:
    """How one dense MLP of I neurons becomes a MoE layer.

    shared: LongTensor [S*m] dense neuron indices of the shared experts.
    experts: LongTensor [E, m] dense neuron indices of each routed expert.
    router: float32 [E, H] gate weight; bias: float32 [E] e_score_correction_bias (the routed
    variant's on the bfloat16 grid, see ``router.snap_to_bfloat16``).
    down_scale: routed experts' down_proj factor (1 / the routing weight each gets).
    """

    shared: torch.Tensor
    experts: torch.Tensor
    router: torch.Tensor
    bias: torch.Tensor
    down_scale: float


def exact_plan(intermediate: int, hidden: int, recipe: DemoRecipe) -> MoePlan:
    """Contiguous slices, a zero router: every weight is softmax(0) = 1/E, so down_proj x E."""
    m = intermediate // (recipe.experts + recipe.shared)
    shared = torch.arange(recipe.shared * m)
    experts = torch.arange(recipe.shared * m, intermediate).reshape(recipe.experts, m)
    zeros = torch.zeros(recipe.experts, hidden)
    return MoePlan(shared, experts, zeros, torch.zeros(recipe.experts), float(recipe.experts))


def neuron_outputs(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """h [T, I] = silu(x gate^T) * (x up^T), the dense MLP's neurons; x [T, H], gate/up [I, H]."""
    return F.silu(x @ gate.T) * (x @ up.T)


def routed_plan(
    x: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    recipe: DemoRecipe,
    generator: torch.Generator,
) -> MoePlan:
    """Shared experts, co-activation clusters and a fitted router for one dense MLP.

    x: float64 [T, H] the MLP's inputs on calibration text; gate/up [I, H]; down [H, I] (float64).
    Steps: (1) the most used neurons become the shared experts; (2) the others are
    clustered by co-activation into E experts of m; (3) a linear router is fitted to
    each expert's log output norm; (4) a few rounds move neurons to the experts the
    router picks when they are active, refitting the router each time.
    Everything runs in float64 and every sort breaks ties by index, so the discrete
    steps see the same order on every machine.
    """
    e, k = recipe.experts, recipe.top_k
    m = gate.shape[0] // (e + recipe.shared)
    h = neuron_outputs(x, gate, up)  # [T, I]
    contrib = h.abs() * down.norm(dim=0)  # [T, I] size of neuron n's output |h_n| * ||down[:, n]||
    by_use = torch.argsort(contrib.mean(0), descending=True, stable=True)  # [I]
    shared = by_use[: recipe.shared * m].sort().values  # [S*m] the most used neurons are always on
    routed = by_use[recipe.shared * m :].sort().values  # [E*m]
    feats = contrib[:, routed].T  # [E*m, T] each neuron's activity over the tokens
    feats = F.normalize(feats - feats.mean(1, keepdim=True), dim=1)  # co-activation: correlation
    assign = balanced_kmeans(feats, e, recipe.kmeans_iters, generator)  # [E*m]
    experts = torch.stack([routed[assign == g] for g in range(e)])  # [E, m]
    fit_router = ridge_solver(x, recipe.ridge)
    a, c = fit_router(expert_log_norms(h, down, experts))  # [E, H], [E]
    energy = contrib[:, routed].square()  # [T, E*m]
    for _ in range(recipe.refine_rounds):
        chosen = torch.argsort(x @ a.T + c, dim=1, descending=True, stable=True)[:, :k]  # [T, A] top k
        experts = refine_experts(energy, routed, chosen, e)
        a, c = fit_router(expert_log_norms(h, down, experts))
    eps = recipe.router_logit_std / (x @ a.T).std().clamp_min(1e-12)  # logit scale
    # softmax(eps * x a^T) ~ (1 + eps * x a_e) / E, so adding eps * c_e / E ranks experts by the prediction
    return MoePlan(shared, experts, snap_to_bfloat16(eps * a), snap_to_bfloat16(eps * c / e), float(k))


def moe_plans(source: DenseSource, recipe: DemoRecipe, num_layers: int, calib_text: str | None) -> dict[int, MoePlan]:
    """The plan of every MoE layer 1 .. num_layers-1 (the routed variant's from the dense model on calib text)."""
    state = source.model.state_dict()
    cfg = source.model.config
    layers = range(1, num_layers)
    if recipe.variant == "exact":
        plan = exact_plan(cfg.intermediate_size, cfg.hidden_size, recipe)
        return {i: plan for i in layers}
    if calib_text is None:
        from ernieq.text import load_text

        calib_text = load_text("demo", split="calib")
    ids = calibration_windows(source.tokenizer, calib_text, recipe.calib_tokens, recipe.calib_seq_len)  # [W, S]
    log.info("demo model: fitting %d MoE layers on %d calibration tokens", len(layers), ids.numel())
    generator = torch.Generator().manual_seed(recipe.seed)
    plans = {}
    with progress_bar() as bar:
        task = bar.add_task("demo model: experts and router per layer", total=len(layers))
        for i, x in mlp_inputs(state, cfg, ids, layers):
            p = f"model.layers.{i}.mlp"
            w = [state[f"{p}.{n}_proj.weight"].double() for n in ("gate", "up", "down")]
            plans[i] = routed_plan(x, *w, recipe, generator)
            bar.advance(task)
            log.debug("demo model: layer %d planned", i)
    log.info("demo model: experts and routers fitted for %d MoE layers", len(plans))
    return plans
