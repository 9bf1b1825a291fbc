"""What every parameter of a transformers causal LM is, read from its module tree.

Walking the instantiated model (on the meta device) classifies each parameter and persistent
buffer by where it sits, not by its name:

- the input embeddings and the output projection (``get_input_embeddings``,
  ``get_output_embeddings``); a parameter reachable under two names is tied;
- in each decoder layer: the child whose class is an attention module (every ``nn.Linear``
  in it is attention); a child holding experts is a MoE block: a module with 3-D ``[E, ...]``
  parameters (fused experts, transformers 5) or an ``nn.ModuleList`` of E alike modules of
  linear layers (per-expert experts, custom code) beside a module with an ``[E, H]`` weight,
  the router; in the block a module with several linear layers is a shared expert, a lone
  linear layer a gate (Qwen2-MoE's ``shared_expert_gate``, kept like the router); any other
  child with linear layers is a dense MLP;
- 1-D parameters of modules whose class is a norm are norms; any other 1-D parameter
  (attention sinks, scalars) is kept as ``other``; a matrix found nowhere above is
  ``unclassified`` (``ernieq quantize`` refuses it unless the recipe names it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ernieq.model.decoder import DecoderStack
from ernieq.model.tensor_info import BIAS, PARAM, WEIGHT, TensorClass

ATTENTION, MLP = "attention", "mlp"


@dataclass(frozen=True)
class Role:
    """One parameter's class, layer, projection, kind and part (see ``TensorInfo``); ``module``:
    the path of the module that owns it; ``container``: the experts module it belongs to."""

    cls: TensorClass
    layer: int | None
    proj: str | None
    kind: str
    part: str | None
    module: str
    container: str | None = None
    expert: int | None = None  # the index of an expert of a per-expert list


@dataclass
class ModelTree:
    """Roles by transformers parameter name; experts modules, routers and norms by path."""

    roles: dict[str, Role] = field(default_factory=dict)
    containers: dict[str, int] = field(default_factory=dict)  # fused experts module path -> layer
    expert_lists: dict[str, int] = field(default_factory=dict)  # per-expert nn.ModuleList path -> layer
    routers: dict[str, str] = field(default_factory=dict)  # experts module path -> router module path
    norms: dict[str, int | None] = field(default_factory=dict)  # norm module path -> layer
    aliases: dict[str, str] = field(default_factory=dict)  # tied name -> the name it is tied to


def _is_attention(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return "attention" in name or name.endswith("attn")


def _is_norm(module: nn.Module) -> bool:
    own = list(module.parameters(recurse=False))
    return "norm" in type(module).__name__.lower() and all(p.dim() == 1 for p in own) and not list(module.children())


def experts_modules(root: nn.Module) -> list[str]:
    """Paths (relative to ``root``) of the modules holding 3-D parameters: fused experts."""
    return [n for n, m in root.named_modules() if any(p.dim() == 3 for p in m.parameters(recurse=False))]


def expert_lists(block: nn.Module) -> list[str]:
    """Names of ``block``'s children that are per-expert lists: an ``nn.ModuleList`` of E (>= 2) modules of
    one class holding linear layers, beside a child with a 2-D weight of E rows (the router)."""
    rows = {p.shape[0] for c in block.children() if not isinstance(c, nn.ModuleList)
            for p in c.parameters(recurse=False) if p.dim() == 2}
    return [name for name, child in block.named_children()
            if isinstance(child, nn.ModuleList) and len(child) >= 2 and len(child) in rows
            and len({type(m) for m in child}) == 1 and len(_linears(child[0])) >= 2]


def _linears(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]


def classify_model(model: nn.Module, stack: DecoderStack) -> ModelTree:
    """The roles of every parameter and persistent buffer of ``model`` (see the module doc)."""
    tree = ModelTree()
    for i, layer in enumerate(model.get_submodule(stack.layers)):
        _classify_layer(tree, f"{stack.layers}.{i}", i, layer)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    for path, module in model.named_modules():
        if path == stack.layers or path.startswith(stack.layers + "."):
            continue
        for pname, p in _own_tensors(module):
            full = f"{path}.{pname}" if path else pname
            if module is emb or module is head:
                cls = TensorClass.EMBEDDING if module is emb else TensorClass.LM_HEAD
                tree.roles[full] = Role(cls, None, None, WEIGHT if pname == "weight" else BIAS, None, path)
            else:
                tree.roles[full] = _plain_role(tree, module, path, p, None, None)
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), name) != name:
            tree.aliases[name] = first[id(p)]
    return tree


def _own_tensors(module: nn.Module):
    """(name, tensor) of the parameters and persistent buffers ``module`` holds itself."""
    yield from module.named_parameters(recurse=False)
    yield from ((n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set)


def _plain_role(tree: ModelTree, module: nn.Module, path: str, p, layer: int | None, part: str | None) -> Role:
    """A tensor of a module that is not a linear layer: a norm's, or kept (1-D), or unclassified."""
    if _is_norm(module):
        tree.norms[path] = layer
        return Role(TensorClass.NORM, layer, None, PARAM, part, path)
    return Role(TensorClass.OTHER if p.dim() <= 1 else TensorClass.UNCLASSIFIED, layer, None, PARAM, part, path)


def _classify_layer(tree: ModelTree, prefix: str, i: int, layer: nn.Module) -> None:
    for child_name, child in layer.named_children():
        base = f"{prefix}.{child_name}"
        if _is_attention(child):
            _classify_block(tree, base, i, child, TensorClass.ATTENTION, ATTENTION)
        elif experts_modules(child) or expert_lists(child):
            _classify_moe(tree, base, i, child)
        else:
            _classify_block(tree, base, i, child, TensorClass.DENSE_MLP, MLP)
    for pname, p in _own_tensors(layer):
        tree.roles[f"{prefix}.{pname}"] = _plain_role(tree, layer, prefix, p, i, MLP)


def _classify_block(tree: ModelTree, base: str, i: int, block: nn.Module, linear_cls: TensorClass, part: str) -> None:
    """Every tensor under ``block``: linear weights and biases as ``linear_cls``, norms, the rest."""
    for name, module in block.named_modules():
        path = f"{base}.{name}" if name else base
        for pname, p in _own_tensors(module):
            if isinstance(module, nn.Linear):
                role = Role(linear_cls, i, path.rpartition(".")[2], WEIGHT if pname == "weight" else BIAS, part, path)
            else:
                role = _plain_role(tree, module, path, p, i, part)
            tree.roles[f"{path}.{pname}"] = role


def _keep_all(tree: ModelTree, base: str, i: int, block: nn.Module, cls: TensorClass) -> None:
    """Every tensor under ``block`` as ``cls``, kept (a router, a shared expert's gate)."""
    for name, module in block.named_modules():
        path = f"{base}.{name}" if name else base
        for pname, _ in _own_tensors(module):
            tree.roles[f"{path}.{pname}"] = Role(cls, i, None, PARAM, MLP, path)


def _classify_moe(tree: ModelTree, base: str, i: int, block: nn.Module) -> None:
    """A MoE block: its experts modules (fused or per-expert lists), router(s), shared experts and gates."""
    experts: dict[str, int] = {}  # container path -> E
    for name in expert_lists(block):
        path = f"{base}.{name}"
        tree.expert_lists[path] = i
        experts[path] = len(block.get_submodule(name))
        for e, expert in enumerate(block.get_submodule(name)):
            for rel, module in expert.named_modules():
                for pname, p in _own_tensors(module):
                    full = f"{path}.{e}.{rel}.{pname}" if rel else f"{path}.{e}.{pname}"
                    if isinstance(module, nn.Linear):
                        kind = WEIGHT if pname == "weight" else BIAS
                        tree.roles[full] = Role(TensorClass.ROUTED_EXPERT, i, rel.rpartition(".")[2], kind, MLP,
                                                full.rpartition(".")[0], path, e)
                    else:
                        tree.roles[full] = _plain_role(tree, module, full.rpartition(".")[0], p, i, MLP)
    for rel in experts_modules(block):
        path = f"{base}.{rel}" if rel else base
        module = block.get_submodule(rel)
        tree.containers[path] = i
        experts[path] = next(p.shape[0] for p in module.parameters(recurse=False) if p.dim() == 3)
        for pname, p in _own_tensors(module):
            kind = WEIGHT if p.dim() == 3 else (BIAS if p.dim() == 2 else PARAM)
            tree.roles[f"{path}.{pname}"] = Role(TensorClass.ROUTED_EXPERT, i, pname, kind, MLP, path, path)
    for name, child in block.named_children():
        path = f"{base}.{name}"
        if path in experts or any(c.startswith(path + ".") for c in experts):
            continue
        rows = {p.shape[0] for p in child.parameters(recurse=False) if p.dim() == 2}
        routed = [c for c, num in experts.items() if num in rows]
        if routed:
            for container in routed:
                tree.routers.setdefault(container, path)
            _keep_all(tree, path, i, child, TensorClass.ROUTER)
        elif len(_linears(child)) >= 2:
            _classify_block(tree, path, i, child, TensorClass.SHARED_EXPERT, MLP)
        elif isinstance(child, nn.Linear):
            _keep_all(tree, path, i, child, TensorClass.ROUTER)
        else:
            _classify_block(tree, path, i, child, TensorClass.DENSE_MLP, MLP)
    for pname, p in _own_tensors(block):
        tree.roles[f"{base}.{pname}"] = _plain_role(tree, block, base, p, i, MLP)
