"""W8A8 FP8 against an independent per-element torch implementation, and weight-only FP8 as it was.

The oracle here is written from the convention alone (DeepSeek-V3's ``act_quant`` / ``fp8_gemm``,
transformers' FineGrainedFP8), one token and one group or block at a time, in float64; it uses
nothing of ernieq but the stored tensors of an encoded weight:

    x_scale = max|x[m, group]| / 448 (float32),  x_hat = e4m3(x / x_scale) * x_scale
    W_hat   = qweight * scale[block]              y = x_hat @ W_hat.T

Shape legend: M rows of x, K input features, N output features, T tokens, E experts, A active
experts per token, H hidden size, I expert intermediate size.
"""

from __future__ import annotations

import pytest
import torch

from ernieq.codecs import CodecError, QuantizedTensor, decode
from ernieq.kernels import MoEWeights, reference
from ernieq.kernels.dequant_gemm import linear
from ernieq.kernels.fused_moe import moe
from tests.kernels.cases import DEVICE, assert_close, encode, encode_stack, seeded
from tests.kernels.test_moe_align import random_ids

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # interpreter sigmoid

E4M3_MAX = 448.0
# (M, N, K): M in {1, 3, 33}; K = 200 ends in a partial 128-wide group and block, N = 72 in a partial block row
SHAPES = [(1, 72, 200), (3, 72, 200), (33, 72, 200), (3, 40, 136)]
DTYPES = [torch.float32, torch.bfloat16]
BLOCKS = [pytest.param(128, id="b128"), pytest.param(None, id="channel"), pytest.param(100, id="b100")]
# oracle (float64, exact products) vs ernieq: fp32 differs only in the float32 sums (measured up to
# 3.4e-4 relative on an output near zero, within the atol); bf16 adds the output's rounding to bf16
# (the Triton interpreter truncates: up to 2^-7 = 7.8e-3 relative; measured 7.7e-3)
ORACLE_TOL = {torch.float32: dict(rtol=1e-5, atol_rel=1e-5), torch.bfloat16: dict(rtol=1e-2, atol_rel=1e-5)}
# (T, E, A, H, I, dtype): H = 200 and I = 136 end in partial groups; T = 1 leaves most experts idle
MOE_CASES = [(1, 4, 2, 200, 136, torch.float32), (5, 4, 2, 200, 136, torch.bfloat16), (17, 3, 2, 136, 72, torch.float32)]


def e4m3(v: torch.Tensor) -> torch.Tensor:
    """v rounded to float8_e4m3fn (torch's cast, ties to even) after clamping to +-448, as float64."""
    return v.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).double()


def oracle_activations(x: torch.Tensor, group: int) -> torch.Tensor:
    """x: [M, K]. Returns x_hat float64 [M, K], one token and one group of input channels at a time."""
    xf = x.float()
    x_hat = torch.zeros(xf.shape, dtype=torch.float64)
    for m in range(xf.shape[0]):
        for k0 in range(0, xf.shape[1], group):
            g = xf[m, k0 : k0 + group]
            s = g.abs().max() / E4M3_MAX  # float32, as stored
            s = s if s > 0 else torch.tensor(1.0)  # an all-zero group: any scale gives zeros
            x_hat[m, k0 : k0 + group] = e4m3(g / s) * s.double()
    return x_hat


def oracle_weight(q: QuantizedTensor) -> torch.Tensor:
    """q: fp8, shape (N, K). Returns W_hat float64 [N, K], one block (or row) at a time."""
    codes, scale, b = q.tensors["qweight"].cpu().double(), q.tensors["scale"].cpu().double(), q.params["block_size"]
    if b is None:
        return codes * scale[:, None]
    w = torch.empty_like(codes)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            w[i * b : (i + 1) * b, j * b : (j + 1) * b] = codes[i * b : (i + 1) * b, j * b : (j + 1) * b] * scale[i, j]
    return w


def oracle_linear(x: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
    """W8A8: activations in groups of the weight's block (per token over all of K per channel). float64 [M, N]."""
    group = q.params["block_size"] or q.shape[1]
    return torch.einsum("mk,nk->mn", oracle_activations(x.cpu(), group), oracle_weight(q))


def oracle_moe(x, topk_ids, topk_weights, weights: MoEWeights) -> torch.Tensor:
    """sum_a w[t, a] * down_e(silu(gate_e x_t) * up_e x_t), token by token; h is float32 before its quantization."""
    x, topk_ids, topk_weights = x.cpu(), topk_ids.cpu(), topk_weights.cpu()
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for a in range(topk_ids.shape[1]):
            gate, up, down = (w.expert(int(topk_ids[t, a])) for w in weights.projections)
            xg = oracle_activations(x[t : t + 1], gate.params["block_size"] or gate.shape[1])  # gate, up: one x
            g = xg @ oracle_weight(gate).T  # [1, I]
            h = (torch.nn.functional.silu(g) * (xg @ oracle_weight(up).T)).float()  # [1, I]
            hd = oracle_activations(h, down.params["block_size"] or down.shape[1])
            out[t] += topk_weights[t, a].double() * (hd @ oracle_weight(down).T)[0]
    return out


def _fp8(block, activations="dynamic"):
    return {"block_size": block, "activations": activations}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("block", BLOCKS)
def test_w8a8_linear_matches_the_per_element_oracle(block, m, n, k, dtype):
    gen = seeded("w8a8", block, m, n, k, str(dtype))
    q = encode("fp8", _fp8(block), n, k, gen)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    x[0, :64] *= 40  # an outlier stretch: its group's scale must not reach the others
    want = oracle_linear(x, q).to(torch.float32).to(dtype)
    assert_close(reference.linear(x, q).cpu(), want, ORACLE_TOL[dtype])
    assert_close(linear(x, q).cpu(), want, ORACLE_TOL[dtype])
    # the oracle tells W8A8 from weight-only: x unquantized misses it by far more than the tolerance
    weight_only = torch.einsum("mk,nk->mn", x.cpu().double(), oracle_weight(q)).to(torch.float32).to(dtype)
    with pytest.raises(AssertionError):
        assert_close(weight_only, want, ORACLE_TOL[dtype])


@pytest.mark.parametrize("t,e,a,h,i,dtype", MOE_CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("block", [pytest.param(128, id="b128"), pytest.param(None, id="channel")])
def test_w8a8_moe_matches_the_per_element_oracle(block, t, e, a, h, i, dtype):
    gen = seeded("w8a8-moe", block, t, e, a, h, i, str(dtype))
    experts = MoEWeights(*(encode_stack("fp8", _fp8(block), e, n, k, gen) for n, k in ((i, h), (i, h), (h, i))))
    x = torch.randn(t, h, generator=gen).to(DEVICE, dtype)
    ids = random_ids(t, a, e, gen).to(DEVICE)
    w = (torch.rand(t, a, generator=gen) + 0.1).to(DEVICE)
    want = oracle_moe(x, ids, w, experts).to(torch.float32).to(dtype)
    # h comes from float32 sums in a different order on each path: an h value within an ulp of an e4m3
    # rounding boundary would round apart there (one e4m3 step of that h element); none does in these cases
    assert_close(reference.moe(x, ids, w, experts).cpu(), want, ORACLE_TOL[dtype])
    assert_close(moe(x, ids, w, experts).cpu(), want, ORACLE_TOL[dtype])


@pytest.mark.parametrize("block", [128, None, 100])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weight_only_is_decode_then_matmul_bit_for_bit(block, dtype):
    """activations="none": the reference is what it was before W8A8 existed, x @ decode(q).T in float32."""
    gen = seeded("w16", block, str(dtype))
    q = encode("fp8", _fp8(block, "none"), 72, 200, gen)
    x = torch.randn(5, 200, generator=gen).to(DEVICE, dtype)
    assert torch.equal(reference.linear(x, q), (x.float() @ decode(q).to(DEVICE).T).to(dtype))
    gate, up, down = (encode_stack("fp8", _fp8(block, "none"), 3, n, k, gen) for n, k in ((40, 200), (40, 200), (200, 40)))
    ids = random_ids(5, 2, 3, gen).to(DEVICE)
    w = (torch.rand(5, 2, generator=gen) + 0.1).to(DEVICE)
    out = torch.zeros(5, 200, device=DEVICE)
    for ex in torch.unique(ids).tolist():  # the loop reference.moe ran before W8A8
        t_idx, a_idx = torch.nonzero(ids == ex, as_tuple=True)
        xe = x.float()[t_idx]
        hh = torch.nn.functional.silu(xe @ decode(gate.expert(ex)).T) * (xe @ decode(up.expert(ex)).T)
        out.index_add_(0, t_idx, (hh @ decode(down.expert(ex)).T) * w[t_idx, a_idx].float()[:, None])
    assert torch.equal(reference.moe(x, ids, w, MoEWeights(gate, up, down)), out.to(dtype))


def test_params_from_before_w8a8_are_refused_not_guessed():
    """fp8 params without an activations mode come from before ernieq computed W8A8: neither path guesses."""
    q = encode("fp8", _fp8(128), 8, 32, seeded("old"))
    old = QuantizedTensor(q.codec, q.shape, q.tensors, {"block_size": 128})
    x = torch.randn(2, 32, device=DEVICE)
    for path in (reference.linear, linear):
        with pytest.raises(CodecError, match="do not say how activations are computed"):
            path(x, old)
