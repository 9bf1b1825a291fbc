"""FastDeploy's tensor-parallel split of an ERNIE 4.5 MoE checkpoint: what each of N ranks loads.

Shape legend: N output features, K input features, H hidden size, V vocabulary,
TP the tensor-parallel degree, r a rank. Paddle stores linear weights as [K, N].

A pre-quantized checkpoint cannot be split at load: FastDeploy's split actions
(``Ernie4_5_PretrainedModel._get_tensor_parallel_mappings`` in
``models/ernie4_5_moe.py``, built by ``split_or_merge_func_v1`` in
``models/tp_utils.py``) cut the columns or rows of ``.weight`` / ``.quant_weight``
tensors as if they were plain matrices, which Paddle's permuted int8/int4 bytes
are not, and nothing splits ``weight_scale``/``super_scales``/``code_*``
(FastDeploy issue #2678). So 2-bit checkpoints are published per TP degree (PR
#2666: ERNIE-4.5-300B-A47B-2Bits-TP2/TP4-Paddle): ``load_composite_checkpoint``
(``model_executor/load_weight_utils.py``) sees more than one ``rank*`` folder in
the model folder, requires ``--tensor-parallel-size`` to equal their number, and
rank r reads ``rank{r}/`` (``model.safetensors`` or an indexed set of shards,
``get_all_weights_file``) as its whole state dict, under the TP-1 names, with no
further split. ``config.json`` (and the tokenizer) stay in the model folder.

What rank r holds is what FastDeploy's layers built for TP ranks load:

- ``qkv_proj`` (``QKVParallelLinear``, split mode GQA): q | k | v with the q
  heads cut into TP blocks and the k, v heads into TP blocks too, or, with fewer
  key/value heads than ranks, each head kept whole and repeated over TP / KV ranks
  (``gqa_qkv_split_func``); rank r holds [q_r | k_r | v_r] along N.
- ``up_gate_proj`` (``MergedColumnParallelLinear``, split mode PairFused; the
  experts in ``FusedMoE``, ``moe_intermediate_size // tp_size``): gate and up each
  cut into TP blocks along N, rank r holds [gate_r | up_r].
- ``o_proj`` and ``down_proj`` (``RowParallelLinear``; the experts' down in
  ``FusedMoE``): cut along K into TP blocks; per-output-channel tensors (scales,
  ``super_scales``, ``code_scale``, ``code_zp``) are whole on every rank, as the
  partial outputs are summed (all-reduce) after the scale.
- ``embed_tokens.weight`` [V, H] (``VocabParallelEmbedding``): rows cut into TP
  blocks; ``lm_head.weight`` [H, V] (``ParallelLMHead``, a column weight): columns
  cut into TP blocks. (Newer FastDeploy pads the vocabulary to a multiple of 64
  before cutting it; the blocks agree when V is a multiple of 64 x TP, as ERNIE
  4.5's 103424 and the demo's 49152 are.)
- everything else (norms, the router ``mlp.gate.weight`` and its correction bias)
  whole on every rank.

Each rank's quantized modules are stored in the module's own layout (Paddle's
int8/int4 layouts of the rank's values; ccq2 tensors cut on whole 128-row scale
bytes), so rank r's files are exactly what a TP-1 checkpoint of rank r's weights
would be. The cuts are exact (``ernieq.formats.quant_slices``): joined back, the
ranks give the TP-1 tensors bit for bit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

import torch

from ernieq.codecs import QuantizedTensor
from ernieq.errors import ErnieqError
from ernieq.formats.quant_slices import cat_k, cat_n, split_k, split_n

RANK_DIR = "rank{}"
RANK_DIR_PATTERN = re.compile(r"^rank(\d+)$")


class ModuleSplit(Protocol):
    """How one (fused) quantized module is cut over TP ranks; ``parts``: its fused parts' N (q, k, v ...)."""

    def local_shape(self, parts: list[int], k: int, tp: int, what: str = "weight") -> tuple[int, int]:
        """(N, K) of every rank's piece; fails, naming ``what``, when the module does not split so."""
        ...

    def split(self, q: QuantizedTensor, parts: list[int], tp: int, what: str) -> list[QuantizedTensor]:
        """q: the TP-1 module (N, K). Returns rank r's piece, r = 0 .. TP-1."""
        ...

    def join(self, pieces: list[QuantizedTensor], parts: list[int], what: str) -> QuantizedTensor:
        """The inverse of ``split``: the TP-1 module from every rank's piece."""
        ...


@dataclass(frozen=True)
class Column:
    """Cut along N, part by part: part p into g equal blocks, rank r taking block ``r * g // TP``.
    g = TP, except for a part of ``heads[p]`` heads marked ``repeat[p]`` with fewer heads than ranks:
    then g = its heads, each kept whole on TP / g ranks. A block never cuts a head."""

    heads: tuple[int | None, ...] = ()  # per part: attention heads in it (None: no heads)
    repeat: tuple[bool, ...] = ()  # per part: may repeat whole heads over ranks (key/value heads)

    def _groups(self, parts: list[int], tp: int, what: str = "weight") -> list[int]:
        groups = []
        for p, size in enumerate(parts):
            heads = self.heads[p] if p < len(self.heads) else None
            g = heads if heads and p < len(self.repeat) and self.repeat[p] and heads < tp else tp
            if tp % g or size % g or (heads and heads % g):
                unit = f"{heads} heads" if heads else f"N={size}"
                raise ErnieqError(f"{what}: part {p} ({unit}) does not split into whole blocks over {tp} ranks")
            groups.append(g)
        return groups

    def local_shape(self, parts: list[int], k: int, tp: int, what: str = "weight") -> tuple[int, int]:
        return sum(size // g for size, g in zip(parts, self._groups(parts, tp, what))), k

    def split(self, q: QuantizedTensor, parts: list[int], tp: int, what: str) -> list[QuantizedTensor]:
        groups = self._groups(parts, tp, what)
        blocks = [split_n(piece, [size // g] * g, what)  # per part: its g blocks
                  for piece, size, g in zip(split_n(q, parts, what), parts, groups)]
        return [cat_n([b[r * g // tp] for b, g in zip(blocks, groups)], what) for r in range(tp)]

    def join(self, pieces: list[QuantizedTensor], parts: list[int], what: str) -> QuantizedTensor:
        tp = len(pieces)
        groups = self._groups(parts, tp, what)
        local = [split_n(piece, [size // g for size, g in zip(parts, groups)], f"{what} (rank {r})")
                 for r, piece in enumerate(pieces)]  # per rank: its block of every part
        joined = []
        for p, g in enumerate(groups):
            blocks = [None] * g
            for r in range(tp):
                b = r * g // tp
                if blocks[b] is None:
                    blocks[b] = (r, local[r][p])
                elif not _same(blocks[b][1], local[r][p]):
                    raise ErnieqError(f"{what}: rank {r} and rank {blocks[b][0]} hold different copies of the "
                                      f"same block of part {p}")
            joined.append(cat_n([q for _, q in blocks], what))
        return cat_n(joined, what)


class Row:
    """Cut along K into TP equal blocks; per-output-channel tensors whole on every rank."""

    def local_shape(self, parts: list[int], k: int, tp: int, what: str = "weight") -> tuple[int, int]:
        if k % tp:
            raise ErnieqError(f"{what}: K={k} does not split into {tp} equal parts")
        return sum(parts), k // tp

    def split(self, q: QuantizedTensor, parts: list[int], tp: int, what: str) -> list[QuantizedTensor]:
        return split_k(q, tp, what)

    def join(self, pieces: list[QuantizedTensor], parts: list[int], what: str) -> QuantizedTensor:
        return cat_k(pieces, what)


def _same(a: QuantizedTensor, b: QuantizedTensor) -> bool:
    return a.shape == b.shape and all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)


def module_splits(config: dict) -> dict[str, ModuleSplit]:
    """FastDeploy module name's last component -> its split. The GQA split keeps whole key/value
    heads: with fewer KV heads than ranks each is repeated over TP / KV ranks."""
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    return {
        "qkv_proj": Column((heads, kv_heads, kv_heads), (False, True, True)),
        "o_proj": Row(),
        "up_gate_proj": Column(),
        "down_proj": Row(),
    }


def module_split(target: str, config: dict) -> ModuleSplit:
    splits = module_splits(config)
    last = target.rsplit(".", 1)[-1]
    if last not in splits:
        raise ErnieqError(f"{target}: no tensor-parallel rule for FastDeploy module {last!r}")
    return splits[last]


# Unquantized tensors cut over ranks (FastDeploy name -> the dimension cut); every other one is whole.
PLAIN_SPLIT_DIMS = ((re.compile(r"^ernie\.embed_tokens\.weight$"), 0), (re.compile(r"^lm_head\.weight$"), 1))


def plain_split_dim(name: str) -> int | None:
    """The dimension FastDeploy cuts the unquantized tensor ``name`` along, None when each rank holds it whole."""
    for pattern, dim in PLAIN_SPLIT_DIMS:
        if pattern.match(name):
            return dim
    return None


def split_plain(name: str, t: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """Rank r's part of the unquantized tensor ``name``."""
    dim = plain_split_dim(name)
    if dim is None:
        return [t] * tp
    if t.shape[dim] % tp:
        raise ErnieqError(f"{name}: dimension {dim} of {list(t.shape)} does not split into {tp} equal blocks")
    return list(t.chunk(tp, dim=dim))


def join_plain(name: str, pieces: list[torch.Tensor], where: list[str]) -> torch.Tensor:
    """The inverse of ``split_plain``; ``where``: each rank's file, for errors."""
    dim = plain_split_dim(name)
    if dim is not None:
        return torch.cat(pieces, dim=dim)
    for r, t in enumerate(pieces[1:], 1):
        if t.shape != pieces[0].shape or not torch.equal(t, pieces[0]):
            raise ErnieqError(f"{where[r]}: tensor {name!r} differs from rank 0's ({where[0]}); "
                              f"every rank holds it whole")
    return pieces[0]


def plain_local_shape(name: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """Every rank's shape of the unquantized tensor ``name`` of TP-1 shape ``shape``."""
    dim = plain_split_dim(name)
    if dim is None or dim >= len(shape):
        return tuple(shape)
    return tuple(s // tp if i == dim else s for i, s in enumerate(shape))
