"""``ccq2``: the convolutional-code 2-bit codec, bit-exact with FastDeploy's ``wint2``.

Shape legend: N output features, K input features, G = ceil(K / 64) local-scale
groups, K4 = ceil(K / 4) bytes per output channel. Our weights are ``W [N, K]``
(torch order); FastDeploy's logical weight is the transpose ``[K, N]``, so every
stored tensor below is K-major like FastDeploy's.

Stored tensors (the contract with the kernels and the FastDeploy exporter):

- ``quant_weight``: uint8 [K4, N]. Byte ``r`` of column ``n`` carries
  ``W[n, 4r + j]``, ``j = 0..3``.
- ``weight_scale``: uint8 [ceil(K / 128), N], two 4-bit local scales per byte:
  the 64-row group ``g`` uses byte ``[g // 2, n]``, its HIGH nibble when ``g`` is
  even, its LOW nibble when ``g`` is odd (an unused last low nibble is 0).
- ``super_scales``: bfloat16 [N] (``super_scale_dtype``; FastDeploy stores the
  model's dtype, bfloat16 for ERNIE 4.5, float16 also works).
- ``code_scale``, ``code_zp``: float32 [N].

Decode, per output channel ``n`` (all in float32)::

    c      = floor(b * code_scale[n] + code_zp[n] + 0.5)     # 15-bit integer
    q_j    = ((c >> s_j) & 0x3F) - 32,  s = (9, 6, 3, 0)     # j = 0..3, q in [-32, 31]
    W_hat  = q * nibble(k // 64, n) * super_scales[n]

Bits per weight: 2 (bytes) + 4/64 (nibbles) + 80 / K (10 bytes per channel).

K that is not a multiple of 4 / 64 / 128 is padded with zero weights of zero
importance (so the padding costs the encoder nothing) and decode drops it.
FastDeploy itself needs K % 128 == 0 (its unzip and Triton kernels step whole
128-row scale bytes); the exporter must refuse, or pad, other shapes.

What FastDeploy's sources say (read with the search tool, PaddlePaddle/FastDeploy):

- ``fastdeploy/model_executor/ops/triton_ops/wint2_fused_moe_kernel.py``
  (``moe_wint2_ffn_kernel``): for BLOCK_SIZE_K = 64 it loads byte rows
  ``offs_bk`` (16 per block) against activation columns ``offs_bk * 4 + j``:
  byte ``r`` holds K rows ``4r .. 4r+3``; ``b = floor(b.to(fp32) * code_bs + code_bzp + 0.5)``
  cast to int16, then ``((b >> 9) & 0x3F) - 32`` for column ``4r``, ``>> 6`` for
  ``4r+1``, ``>> 3`` for ``4r+2``, ``& 0x3F`` for ``4r+3``; the local scale is
  ``((bs >> (1 - k % 2) * 4) & 0xF) * super_bs`` with the scale pointer advanced
  every second 64-row block: high nibble for even groups.
- ``custom_ops/gpu_ops/cutlass_extensions/gemm/threadblock/wint2x_unzip.h``
  (``UnzipAndDequantFunctor<kWeightOnlyInt2>``): the same math with
  ``local_scale_shift = ((row / 64 + 1) & 1) * 4``, computed in float
  (``ScaleComputeT = float``): ``scale = float(nibble) * float(super_scale)``,
  ``out = T(scale * float(q))``; its comment lists the dtypes: weight uint8,
  local_scale uint8, code_scale float, code_zp float, super_scale T.
- ``custom_ops/gpu_ops/moe/winx_unzip.cu``: ``local_scale`` uint8 ("uint4"),
  ``code_scale``/``code_zp`` float32, ``super_scale`` of the output dtype
  (bf16/fp16); the output rows are ``zipped rows * 4``.
- ``fastdeploy/model_executor/layers/moe/fused_moe_wint2_backend.py``
  (``create_weights``): per layer ``up_gate_proj_weight`` uint8 [E, hidden/4, 2*inter],
  ``..._weight_scale`` uint8 [E, hidden/128, 2*inter], ``..._super_scales``
  [E, 2*inter] in the default (model) dtype, ``..._code_scale`` / ``..._code_zp``
  float32 [E, 2*inter]; the Cutlass path permutes the weight bytes after loading,
  so the checkpoint keeps the plain layout above.
- ``fastdeploy/model_executor/models/ernie4_5_moe.py``: checkpoint names
  ``{prefix}.experts.{e}.up_gate_proj.quant_weight`` / ``.weight_scale`` /
  ``.super_scales`` / ``.code_scale`` / ``.code_zp`` (and ``down_proj``).
- ``fastdeploy/model_executor/layers/quantization/wint2.py``: the ``wint2`` config;
  MoE layers up to ``moe_w4_quant_end_layer`` use wint4, later ones wint2.

Float exactness: a kernel may fuse ``b * code_scale + code_zp`` into one FMA
(Triton does by default, ``enable_fp_fusion``) or round twice (torch eager, this
decode). The encoder only emits dyadic ``code_scale``/``code_zp`` for which both
are exact (``check_code_grid``), so every kernel gets the same ``c``; ``q * nibble
* super_scale`` is exact in float32 too (6 + 4 + 8 significant bits, 11 for
float16). Decode returns that float32 value; FastDeploy's Cutlass path computes
it in float32 and rounds once to bf16, its Triton kernel rounds ``nibble *
super_scale`` to the activation dtype first (a bf16 rounding we do not copy).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from ernieq.codecs.base import (
    CalibrationStats,
    CodecBase,
    CodecError,
    QuantizedTensor,
    check_layout,
    check_weight,
    register_codec,
)
from ernieq.codecs.ccq2_search import (
    GROUP,
    NIBBLE_MAX,
    Q_ABS_MAX,
    QUAD,
    QUADS_PER_GROUP,
    GroupChoice,
    check_code_grid,
    choose_code_grid,
    choose_super_scale,
    closed_form_nibbles,
    code_words,
    energy,
    expand_codes,
    least_squares,
    lloyd_steps,
    refine_super_scale,
    repick_nibbles,
    retry_groups,
    search,
    start_scales,
)

log = logging.getLogger(__name__)

SCALE_BYTE_ROWS = 2 * GROUP  # one weight_scale byte row covers 128 K rows
SUPER_SCALE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}

# Code grids (code_scale, code_zp): the 32 whose 256 words have the least mean
# squared error on i.i.d. unit Gaussian 4-vectors at their best of 15/16/17 code
# units per standard deviation (0.110 .. 0.113 per weight), ordered greedily so
# that the first C, each channel taking its best, fit Gaussian channels best
# (``grid_candidates`` takes the first C); measured by
# ``python benchmarks/ccq2_encoder.py scan-grids``. All dyadic: exact in float32.
CODE_GRID_POOL: tuple[tuple[float, float], ...] = (
    (120.0, 1100.0), (120.0, 540.0), (121.0, 1100.0), (121.0, 540.0),
    (121.0, 1600.0), (121.0, 800.0), (120.875, 1100.0), (121.0, 200.0),
    (123.125, 800.0), (120.875, 1600.0), (120.875, 540.0), (120.875, 800.0),
    (123.125, 1100.0), (120.0, 800.0), (123.125, 540.0), (121.75, 540.0),
    (121.75, 800.0), (121.75, 1600.0), (121.75, 200.0), (121.75, 1100.0),
    (117.875, 1600.0), (120.0, 1600.0), (123.125, 200.0), (117.75, 1600.0),
    (117.75, 1100.0), (119.875, 800.0), (119.875, 1100.0), (120.875, 200.0),
    (117.875, 800.0), (123.25, 540.0), (119.875, 1600.0), (120.0, 200.0),
)  # fmt: skip


@dataclass(frozen=True)
class CCQ2Config:
    """Search knobs of the ccq2 encoder (decode needs none of them).

    The encoder's cost is its number of byte searches over all weights (see
    ``fit``): ``grid_candidates + 1 + scale_steps + refine_steps``, plus searches
    over a few groups only (outliers, moved nibbles: about 0.1 on Gaussian weights;
    one more full search with importance, where every group tries the amax scale).

    code_scale, code_zp: one fixed code grid for every channel (both or neither);
        None: each channel picks the best of the first ``grid_candidates`` grids
        of ``CODE_GRID_POOL``.
    grid_candidates: how many pool grids each channel tries (one search each).
    units_per_std: the starting local scale is group RMS / units_per_std.
    outlier_ratio: a group whose absolute max exceeds this many RMS also tries the
        scale that keeps its max (amax / 31); 0 makes every group try it, as every
        group does with importance (a weighted RMS does not tell outliers apart).
    scale_steps: Lloyd iterations (least-squares scale, then bytes) before the nibbles.
    nibble_window: each group weighs nibbles floor(r) - window + 1 .. floor(r) + window
        around its least-squares scale r (in super-scale units), and 0.
    nibble_repicks: rounds of weighing the nibbles again for the final bytes, each
        with a search over the groups whose nibble moved (a few %).
    refine_steps: rounds of least-squares super-scale refinement.
    quarter_unit_search: without importance, search the bytes against targets
        rounded to 1/4 code unit (exact integer arithmetic, ~1.5x faster, ~0.02 %
        more error); with importance the search is always in float32.
    super_scale_dtype: "bfloat16" (ERNIE 4.5 in FastDeploy) or "float16".
    hessian_damp: importance = diag(H) + damp * mean(diag(H)), as GPTQ dampens.
    """

    code_scale: float | None = None
    code_zp: float | None = None
    grid_candidates: int = 3
    units_per_std: float = 16.0
    outlier_ratio: float = 3.5
    scale_steps: int = 0
    nibble_window: int = 1
    nibble_repicks: int = 1
    refine_steps: int = 0
    quarter_unit_search: bool = True
    super_scale_dtype: str = "bfloat16"
    hessian_damp: float = 0.01

    def __post_init__(self):
        if (self.code_scale is None) != (self.code_zp is None):
            raise CodecError("ccq2: give both code_scale and code_zp, or neither")
        if self.code_scale is not None:
            check_code_grid(torch.tensor([self.code_scale]), torch.tensor([self.code_zp]))
        if not 1 <= self.grid_candidates <= len(CODE_GRID_POOL):
            raise CodecError(f"ccq2: grid_candidates must lie in 1..{len(CODE_GRID_POOL)}, got {self.grid_candidates}")
        if not self.units_per_std > 0:
            raise CodecError(f"ccq2: units_per_std must be positive, got {self.units_per_std}")
        if not self.outlier_ratio >= 0:
            raise CodecError(f"ccq2: outlier_ratio must be >= 0, got {self.outlier_ratio}")
        for knob in ("scale_steps", "nibble_repicks", "refine_steps"):
            if getattr(self, knob) < 0:
                raise CodecError(f"ccq2: {knob} must be >= 0, got {getattr(self, knob)}")
        if self.nibble_window < 1:
            raise CodecError(f"ccq2: nibble_window must be >= 1, got {self.nibble_window}")
        if self.super_scale_dtype not in SUPER_SCALE_DTYPES:
            raise CodecError(f"ccq2: super_scale_dtype must be one of {sorted(SUPER_SCALE_DTYPES)}")
        if self.hessian_damp < 0:
            raise CodecError(f"ccq2: hessian_damp must be >= 0, got {self.hessian_damp}")


@dataclass
class CCQ2Fit:
    """The encoder's choices for one weight, unpacked (what a GPTQ loop works with).

    code_scale, code_zp: float32 [N]; table: int32 [N, 256, 4], the code words of
    each channel's grid; super_scale: float32 [N] (a value of the storage dtype);
    nibble: int64 [N, G]; codes: uint8 [N, G * 16] (bytes, padding quads included);
    err: float32 [N, G], the importance-weighted squared error per group.
    """

    code_scale: torch.Tensor
    code_zp: torch.Tensor
    table: torch.Tensor
    super_scale: torch.Tensor
    nibble: torch.Tensor
    codes: torch.Tensor
    err: torch.Tensor


def importance(stats: CalibrationStats | None, k: int, damp: float, device, name: str) -> torch.Tensor | None:
    """Per-input-channel importance [K] from calibration statistics, or None (uniform).

    The Hessian diagonal (E[x_k^2]) when there is one, else ``act_abs_mean ** 2``,
    dampened by ``damp * mean``. Statistics that carry no signal (all zero: an
    expert that saw no tokens) log a warning and give uniform importance.
    """
    if stats is None:
        return None
    if stats.hessian is not None:
        h = stats.hessian
        if tuple(h.shape) != (k, k):
            raise CodecError(f"{name}: Hessian of shape {tuple(h.shape)} for a weight with K={k}")
        d = torch.diagonal(h).to(device=device, dtype=torch.float32)
    elif stats.act_abs_mean is not None:
        a = stats.act_abs_mean
        if tuple(a.shape) != (k,):
            raise CodecError(f"{name}: act_abs_mean of shape {tuple(a.shape)} for a weight with K={k}")
        d = a.to(device=device, dtype=torch.float32) ** 2
    else:
        return None
    if not torch.isfinite(d).all():
        raise CodecError(f"{name}: non-finite calibration statistics")
    d = d.clamp(min=0)
    mean = d.mean()
    if not mean > 0:
        log.warning("%s: calibration statistics are all zero (no tokens?); using uniform importance", name)
        return None
    return (d + damp * mean) / ((1 + damp) * mean)  # normalised to mean 1


def fit(w: torch.Tensor, imp: torch.Tensor | None, config: CCQ2Config, *, scales_only: bool = False) -> CCQ2Fit:
    """Search every choice of the code for ``w`` [N, K] float32 with importance [K] (or [N, K],
    one per channel: several weights fitted in one call) or None.

    scales_only: stop once the code grids and super scales are chosen (what GPTQ needs
    when it refits every group's nibble itself): nibble is then 0 and codes and err are
    those of the starting scales. Ignored with ``refine_steps``, which moves the super
    scale after the nibbles.

    Byte searches, in order: one per candidate grid over all weights at the RMS
    starting scales (``choose_code_grid``; the winner's bytes are kept), one over
    the outlier groups at their amax scale (``retry_groups``), ``scale_steps`` Lloyd
    steps, the super scale and nibbles in closed form for the current bytes
    (``closed_form_nibbles``) and one search for those scales, ``nibble_repicks``
    searches over the groups whose nibble then moves, ``refine_steps`` super-scale
    rounds. Channels that picked the same grid go through the steps after the
    first together (one shared table: the quarter-unit search needs it).

    The search runs on each channel divided by a power of two near its absolute
    max (exact, and commuting with the rounding of the super scale), so squared
    errors stay far from float32 overflow whatever the weights' magnitude.
    """
    n, k = w.shape
    g = -(-k // GROUP)  # G = ceil(K / 64)
    pad = g * GROUP - k
    amax = w.abs().amax(1)  # [N]
    unit = torch.exp2(torch.where(amax > 0, torch.floor(torch.log2(amax)), torch.zeros_like(amax)))  # 2^e  [N]
    x = torch.nn.functional.pad(w / unit[:, None], (0, pad)).reshape(n, g, QUADS_PER_GROUP, QUAD)  # [N, G, 16, 4]
    if imp is None and pad:
        imp = torch.ones(k, device=w.device)
    q_imp = None if imp is None else torch.nn.functional.pad(imp, (0, pad)).unflatten(-1, (g, QUADS_PER_GROUP, QUAD))
    per_row = q_imp is not None and q_imp.ndim == 4  # [N, G, 16, 4], else [G, 16, 4]
    quarter = config.quarter_unit_search and q_imp is None
    s_rms, s_amax = start_scales(x, q_imp, config.units_per_std)  # [N, G] each
    e0 = energy(x, q_imp)  # [N, G], the error of decoding to 0

    if config.code_scale is not None:
        grids = torch.tensor([[config.code_scale, config.code_zp]], device=w.device)  # [1, 2]
    else:
        grids = torch.tensor(CODE_GRID_POOL[: config.grid_candidates], device=w.device)  # [C, 2]
    tables = code_words(grids[:, 0], grids[:, 1])  # [C, 256, 4]
    pick, choice = choose_code_grid(x, q_imp, tables, s_rms, e0, quarter_units=quarter)  # [N], bytes at s_rms

    super_scale = torch.empty(n, device=w.device)
    nibble = torch.empty(n, g, dtype=torch.int64, device=w.device)
    codes = torch.empty(n, g, QUADS_PER_GROUP, dtype=torch.uint8, device=w.device)
    err = torch.empty(n, g, device=w.device)
    for c in pick.unique().tolist():  # the channels of one grid share its table
        rows = (pick == c).nonzero()[:, 0]  # [N_c]
        sub_imp = q_imp[rows] if per_row else q_imp
        sub_super, sub_nibble, sub = fit_channels(
            x[rows], sub_imp, tables[c], e0[rows], choice.rows(rows), s_amax[rows], config, quarter,
            scales_only and not config.refine_steps,
        )
        super_scale[rows], nibble[rows], codes[rows], err[rows] = sub_super, sub_nibble, sub.codes, sub.err
    code_scale, code_zp = grids[pick, 0].contiguous(), grids[pick, 1].contiguous()  # [N]
    super_scale = super_scale * unit  # back to weight units, exact
    err = err * (unit * unit)[:, None]  # back to weight units
    return CCQ2Fit(code_scale, code_zp, tables[pick], super_scale, nibble, codes.reshape(n, -1), err)


def fit_channels(
    x: torch.Tensor,
    imp: torch.Tensor | None,
    table: torch.Tensor,
    e0: torch.Tensor,
    choice: GroupChoice,
    s_amax: torch.Tensor,
    config: CCQ2Config,
    quarter: bool,
    scales_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, GroupChoice]:
    """Scales and bytes for channels that share one code grid, from their bytes at the RMS scales.

    x: [N, G, 16, 4]; imp: [G, 16, 4] (or [N, G, 16, 4]) or None; table: [256, 4]; e0: [N, G] the
    groups' energy; choice: the bytes at the RMS scales; s_amax: [N, G] the scales
    that keep each group's max; quarter: the quarter-unit search; scales_only: return
    once the super scale is chosen (nibbles 0, the choice so far).
    Returns (super_scale [N], nibble int64 [N, G], the final choice).
    """
    s_rms = choice.scale
    outliers = s_amax * Q_ABS_MAX > config.outlier_ratio * s_rms * config.units_per_std  # amax > ratio * RMS
    if imp is not None:  # an importance-weighted RMS does not tell outliers apart: every group tries
        outliers = torch.ones_like(outliers)
    choice = retry_groups(x, imp, table, e0, choice, outliers, s_amax, quarter_units=quarter)
    choice = lloyd_steps(x, imp, table, e0, choice, config.scale_steps, quarter_units=quarter)
    ls = least_squares(choice)  # [N, G]
    dtype = SUPER_SCALE_DTYPES[config.super_scale_dtype]
    super_scale = choose_super_scale(ls, dtype)  # [N]
    if scales_only:
        return super_scale, torch.zeros_like(choice.codes[..., 0], dtype=torch.int64), choice
    nibble, err = closed_form_nibbles(e0, choice, super_scale, ls, config.nibble_window)  # no search
    scale = nibble * super_scale[:, None]  # local scale = nibble * super  [N, G]
    choice = GroupChoice(scale, choice.codes, choice.xt, choice.tt, err)  # the current bytes at the final scales
    choice = choice.better_of(search(x, imp, table, scale, e0, quarter_units=quarter))  # and fresh bytes
    for _ in range(config.nibble_repicks):
        nibble, choice = repick_nibbles(
            x, imp, table, e0, super_scale, nibble, choice, config.nibble_window, quarter_units=quarter
        )
    for _ in range(config.refine_steps):
        super_scale, choice = refine_super_scale(
            x, imp, table, e0, super_scale, nibble, choice, dtype, quarter_units=quarter
        )
    return super_scale, nibble, choice


def pack_local_scales(nibble: torch.Tensor) -> torch.Tensor:
    """nibble: [N, G] in 0..15. Returns weight_scale uint8 [ceil(G / 2), N]:
    group g in byte [g // 2, n], high nibble for even g, low nibble for odd g."""
    if nibble.numel() and (int(nibble.min()) < 0 or int(nibble.max()) > NIBBLE_MAX):
        raise CodecError("ccq2: local scales must lie in 0..15")
    nib = torch.nn.functional.pad(nibble.to(torch.uint8), (0, nibble.shape[1] % 2))  # [N, 2 * G2]
    return ((nib[:, 0::2] << 4) | nib[:, 1::2]).t().contiguous()  # byte = (even << 4) | odd


def unpack_local_scales(weight_scale: torch.Tensor, g: int) -> torch.Tensor:
    """weight_scale: uint8 [ceil(G / 2), N]. Returns the nibbles uint8 [N, G]."""
    ws = weight_scale.t()  # [N, G2]
    nib = torch.stack([ws >> 4, ws & 0xF], dim=-1)  # [N, G2, 2]: even group high, odd low
    return nib.flatten(1)[:, :g]


@register_codec("ccq2", CCQ2Config)
class CCQ2Codec(CodecBase):
    config: CCQ2Config

    def encode(
        self, weight: torch.Tensor, stats: CalibrationStats | None = None, *, name: str = "weight"
    ) -> QuantizedTensor:
        """weight: [N, K], any float dtype, on any device. stats: the Hessian
        diagonal (or act_abs_mean^2) weights the error per input channel.

        Returns quant_weight uint8 [K4, N], weight_scale uint8 [ceil(K/128), N],
        super_scales [N] (super_scale_dtype), code_scale float32 [N], code_zp float32 [N].
        """
        w = check_weight(weight, name)  # [N, K] float32
        n, k = w.shape
        imp = importance(stats, k, self.config.hessian_damp, w.device, name)
        f = fit(w, imp, self.config)
        k4 = -(-k // QUAD)
        super_scales = f.super_scale.to(SUPER_SCALE_DTYPES[self.config.super_scale_dtype])
        dtype_name = self.config.super_scale_dtype
        if not torch.isfinite(super_scales).all():
            raise CodecError(f"{name}: super scales overflow {dtype_name} (weights up to {w.abs().max():.3g})")
        lost = int(((super_scales == 0) & (f.nibble.amax(1) > 0)).sum())
        if lost:
            log.warning("%s: %d channel(s) too small for %s super scales decode to zero", name, lost, dtype_name)
        tensors = {
            "quant_weight": f.codes[:, :k4].t().contiguous(),  # [K4, N]
            "weight_scale": pack_local_scales(f.nibble),  # [ceil(K/128), N]
            "super_scales": super_scales,
            "code_scale": f.code_scale.to(torch.float32),
            "code_zp": f.code_zp.to(torch.float32),
        }
        return QuantizedTensor(self.name, (n, k), tensors, dataclasses.asdict(self.config))

    def decode(self, q: QuantizedTensor) -> torch.Tensor:
        """q: shape (N, K). Returns float32 W_hat [N, K] = q_code * nibble * super_scale."""
        self._check_layout(q)
        n, k = q.shape
        t = q.tensors
        b = t["quant_weight"].t()  # [N, K4]
        code = expand_codes(b, t["code_scale"][:, None], t["code_zp"][:, None])  # [N, K4, 4] int32
        code = code.flatten(1)[:, :k].to(torch.float32)  # [N, K]
        nib = unpack_local_scales(t["weight_scale"], -(-k // GROUP)).to(torch.float32)  # [N, G]
        scale = nib * t["super_scales"].to(torch.float32)[:, None]  # local scale = nibble * super  [N, G]
        return code * scale.repeat_interleave(GROUP, dim=1)[:, :k]  # W_hat = q * nibble * super

    def _check_layout(self, q: QuantizedTensor) -> None:
        """Fail loudly when ``q`` is not a ccq2 tensor of its own shape (any encoder settings; super
        scales in either dtype FastDeploy reads)."""
        ss_dtype = q.tensors.get("super_scales", torch.empty(0)).dtype
        if ss_dtype not in SUPER_SCALE_DTYPES.values():
            raise CodecError(f"ccq2: super_scales must be bfloat16 or float16, got {ss_dtype}")
        check_layout(self, q, lambda n, k: {
            "quant_weight": (torch.uint8, (-(-k // QUAD), n)),
            "weight_scale": (torch.uint8, (-(-k // SCALE_BYTE_ROWS), n)),
            "super_scales": (ss_dtype, (n,)),
            "code_scale": (torch.float32, (n,)),
            "code_zp": (torch.float32, (n,)),
        }, params=False)
