"""FastDeploy's checkpoint layouts written apart from ernieq, in numpy, for the tests to check ernieq against.

Straight from DESIGN.md §3.1 (ccq2 = FastDeploy wint2), Paddle's ``weight_quantize``
permutation kernels (``weight_permute_kernel_wint8/_wint4``, ``weight_interval_kernel_wint4``)
and FastDeploy's tensor-parallel split rules (``models/tp_utils.py``: GQA and PairFused
column splits, row splits; ``VocabParallelEmbedding``, ``ParallelLMHead``). Nothing here
imports ernieq. The Paddle layout hashes were made with Paddle 3.3.1 (CPU) itself::

    v = (arange(128)[:, None] * 37 + arange(192)[None, :] * 11) % (hi - lo + 1) + lo; v[:, 0] = hi
    q, s = paddle.nn.quant.weight_quantize(paddle.to_tensor(v.T.astype("float32")).astype("bfloat16"),
                                           algo=algo, arch=80)   # s == 1 everywhere
    hashlib.sha256(q.numpy().tobytes()).hexdigest()

(arch 86, 89 and 90 give the same bytes.)
"""

from __future__ import annotations

import numpy as np
import torch

PADDLE_331_INT8_SHA256 = "4112560fc2c9c62e895eb491a83e57f95ff4a133ab68c825c94baf85a7c2b126"
PADDLE_331_INT4_SHA256 = "0a23a215cc834b8bffa81f48fc5f3de9bd0b4ebed739b91efac766fdc47e953f"

_INT8_ORDER = np.array([0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15])
_INT4_ORDER = np.array([0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15])
_NIBBLE_SOURCES = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds (nibble _NIBBLE_SOURCES[i] + 8) & 0xF


def np_of(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy() if t.dtype in (torch.bfloat16, torch.float16) else t.numpy()


# ------------------------------------------------------------ ccq2 (FastDeploy wint2)


def ccq2_decode(quant_weight, weight_scale, super_scales, code_scale, code_zp) -> np.ndarray:
    """DESIGN.md §3.1 written out: returns float32 W [K, N] (Paddle's [in, out] order)."""
    b = np_of(quant_weight).astype(np.float32)  # [K/4, N]
    c = np.floor(b * np_of(code_scale) + np_of(code_zp) + np.float32(0.5)).astype(np.int32)  # 15-bit codes
    k4, n = b.shape
    w = np.zeros((4 * k4, n), np.float32)
    for j, shift in enumerate((9, 6, 3, 0)):
        w[j::4] = ((c >> shift) & 0x3F) - 32  # row 4r + j
    ws = np_of(weight_scale).view(np.uint8)  # [K/128, N]
    for row in range(4 * k4):
        g = row // 64
        byte = ws[g // 2].astype(np.int32)
        nibble = byte >> 4 if g % 2 == 0 else byte & 0xF  # even group: high nibble
        w[row] *= nibble.astype(np.float32) * np_of(super_scales)
    return w


# ------------------------------------------------------------ Paddle's weight_only_int8 / int4 layouts


def _int8_index(n: int, k: int) -> np.ndarray:
    kk = _INT8_ORDER[np.arange(k) % 16] + np.arange(k) // 16 * 16
    return np.add.outer(64 * (np.arange(n) % 2) + 2 * k * (np.arange(n) // 2), kk % 64 + kk // 64 * 128)  # [N, K]


def _int4_index(n: int, k: int) -> np.ndarray:
    j = np.arange(k // 2)
    jj = _INT4_ORDER[j % 16] + j // 16 * 16
    return np.add.outer(32 * (np.arange(n) % 4) + 2 * k * (np.arange(n) // 4), jj % 32 + jj // 32 * 128)  # [N, K/2]


def paddle_int8_values(quant_weight: torch.Tensor) -> np.ndarray:
    """Read Paddle's weight_only_int8 bytes back: int values [N, K] (weight_permute_kernel_wint8 inverted)."""
    flat = quant_weight.numpy().reshape(-1).view(np.uint8).astype(np.int32)
    n, k = quant_weight.shape
    return flat[_int8_index(n, k)] - 128


def paddle_int8_bytes(v: np.ndarray) -> torch.Tensor:
    """int values [N, K] in [-127, 127] to Paddle's weight_only_int8 bytes, int8 [N, K]."""
    n, k = v.shape
    flat = np.empty(n * k, np.uint8)
    flat[_int8_index(n, k)] = (v.astype(np.int32) + 128).astype(np.uint8)
    return torch.from_numpy(flat.view(np.int8).reshape(n, k).copy())


def paddle_int4_values(quant_weight: torch.Tensor) -> np.ndarray:
    """Read Paddle's weight_only_int4 bytes back: int values [N, K] (interval + permute kernels inverted)."""
    half_n, k = quant_weight.shape
    words = quant_weight.numpy().reshape(-1).view("<u4")
    stored = [(words >> (4 * i)) & 0xF for i in range(8)]
    original = [None] * 8
    for i, src in enumerate(_NIBBLE_SOURCES):  # nibble i holds (nibble src + 8) & 0xF
        original[src] = (stored[i] - 8) & 0xF
    word = sum(original[i].astype(np.uint64) << np.uint64(4 * i) for i in range(8)).astype("<u4")
    flat = word.view(np.uint8).astype(np.int32)  # the permuted packed bytes
    n = 2 * half_n
    packed = flat[_int4_index(n, k)]
    nibbles = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(n, k)  # even row in the low nibble
    return np.where(nibbles >= 8, nibbles - 16, nibbles)  # two's complement


def paddle_int4_bytes(v: np.ndarray) -> torch.Tensor:
    """int values [N, K] in [-8, 7] to Paddle's weight_only_int4 bytes, int8 [N/2, K]."""
    n, k = v.shape
    nib = (v.astype(np.int32) & 0xF).astype(np.uint8)
    packed = nib[:, 0::2] | (nib[:, 1::2] << 4)  # byte j: row 2j low, row 2j + 1 high
    flat = np.empty(n * k // 2, np.uint8)
    flat[_int4_index(n, k)] = packed
    words = flat.view("<u4")
    original = [(words >> np.uint32(4 * i)) & np.uint32(0xF) for i in range(8)]
    stored = sum(((original[src] + np.uint32(8)) & np.uint32(0xF)) << np.uint32(4 * i)
                 for i, src in enumerate(_NIBBLE_SOURCES)).astype("<u4")
    return torch.from_numpy(stored.view(np.uint8).view(np.int8).reshape(n // 2, k).copy())


# ------------------------------------------------------------ FastDeploy's tensor-parallel split


def _blocks(size: int, parts: int) -> list[slice]:
    step = size // parts
    return [slice(i * step, (i + 1) * step) for i in range(parts)]


def _rows_of_rank(config: dict, module: str, n: int, tp: int, r: int) -> np.ndarray:
    """The output channels (rows of our [N, K]) rank r holds of a column-parallel module."""
    if module.endswith("qkv_proj"):
        heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
        d = n // (heads + 2 * kv)
        q, kvw = heads * d, kv * d
        q_rows = np.arange(q)[_blocks(q, tp)[r]]
        kv_block = _blocks(kvw, kv)[r // (tp // kv)] if kv < tp else _blocks(kvw, tp)[r]  # repeat_kv
        return np.concatenate([q_rows, q + np.arange(kvw)[kv_block], q + kvw + np.arange(kvw)[kv_block]])
    half = n // 2  # up_gate_proj: gate | up, each split (PairFused)
    return np.concatenate([np.arange(half)[_blocks(half, tp)[r]], half + np.arange(half)[_blocks(half, tp)[r]]])


def tp_split(tensors: dict[str, torch.Tensor], config: dict, tp: int) -> list[dict[str, torch.Tensor]]:
    """Every FastDeploy tensor of a TP-1 checkpoint cut for ``tp`` ranks as FastDeploy's TP layers hold it."""
    ranks = [{} for _ in range(tp)]
    for name, t in tensors.items():
        module, _, local = name.rpartition(".")
        column_parallel = module.endswith(("qkv_proj", "up_gate_proj"))
        ccq2 = f"{module}.super_scales" in tensors
        wint4 = ".experts." in module and not ccq2
        for r in range(tp):
            if name == "ernie.embed_tokens.weight":
                piece = t[_blocks(t.shape[0], tp)[r]]  # [V, H]: vocab rows
            elif name == "lm_head.weight":
                piece = t[:, _blocks(t.shape[1], tp)[r]]  # [H, V]: vocab columns
            elif ccq2 and local in ("quant_weight", "weight_scale"):  # [K/4, N], [K/128, N]
                if column_parallel:
                    piece = t[:, _rows_of_rank(config, module, t.shape[1], tp, r)]
                else:
                    piece = t[_blocks(t.shape[0], tp)[r]]
            elif local == "quant_weight":  # Paddle int8 / int4 bytes of values [N, K]
                values = paddle_int4_values(t) if wint4 else paddle_int8_values(t)
                if column_parallel:
                    values = values[_rows_of_rank(config, module, values.shape[0], tp, r)]
                else:
                    values = values[:, _blocks(values.shape[1], tp)[r]]
                piece = paddle_int4_bytes(values) if wint4 else paddle_int8_bytes(values)
            elif column_parallel and local in ("weight_scale", "super_scales", "code_scale", "code_zp"):
                piece = t[_rows_of_rank(config, module, t.shape[0], tp, r)]  # [N]
            else:
                piece = t  # norms, router, per-channel tensors of row-parallel modules: whole
            ranks[r][name] = piece.contiguous()
    return ranks
