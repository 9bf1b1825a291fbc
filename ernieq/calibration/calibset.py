"""The result of a calibration pass: statistics by weight name, the expert table, the routers.

Weight names are the checkpoint's (routed experts by their canonical per-expert
names, ``model.layers.N.mlp.experts.M.{gate,up,down}_proj.weight``). Weights
that read the same input share one *site* (q/k/v share q's, gate/up share
gate's), so one Hessian is stored per distinct input.

Routed experts have two kinds of statistics:

- *routed*: from the tokens the router sent to the expert (always collected);
- *all-token* (``collect_stats(all_experts=True)``): from every token of the
  layer, as if the router had picked the expert for all of them; the layer's
  output is computed as usual.

:meth:`CalibrationSet.stats` answers with the routed statistics of a warm
expert and with the all-token statistics of a cold one (fewer than
``cold_min_tokens`` tokens or under ``cold_share`` of the layer's tokens) when
they exist. An expert that saw no token and has no all-token statistics gets
None: the codec rounds it to nearest (its scales are still finite), and the
expert is listed by :meth:`cold_experts`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ernieq.calibration.accumulate import RouterStats, SiteStats
from ernieq.codecs import CalibrationStats

COLD_SHARE = 0.005  # an expert under 0.5 % of its layer's tokens is cold
COLD_MIN_TOKENS = 128  # ... and so is one under 128 tokens, whatever the share
SUMMARY_VERSION = 1


@dataclass(frozen=True)
class ExpertRow:
    """One routed expert: tokens routed to it, share = tokens / T, load_share = tokens / (T A),
    mean_prob = its mean routing probability."""

    layer: int
    expert: int
    tokens: int
    share: float
    load_share: float
    mean_prob: float

    def is_cold(self, threshold: float = COLD_SHARE, min_tokens: int = COLD_MIN_TOKENS) -> bool:
        return self.share < threshold or self.tokens < min_tokens


@dataclass
class CalibrationSet:
    """Calibration statistics of one model on one calibration text.

    sites: statistics by site name (in memory, or a ``SiteStore`` that reads them from disk when asked).
    routes: weight name -> site (routed / ordinary).
    all_token_routes: routed-expert weight name -> its all-token site.
    expert_of: routed-expert weight name -> (layer, expert).
    experts: one row per routed expert. routers: router statistics by layer.
    info: what was run (model, sequences, sequence length, all_experts, seconds).
    """

    sites: dict[str, SiteStats]
    routes: dict[str, str]
    all_token_routes: dict[str, str] = field(default_factory=dict)
    expert_of: dict[str, tuple[int, int]] = field(default_factory=dict)
    experts: list[ExpertRow] = field(default_factory=list)
    routers: dict[int, RouterStats] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    cold_share: float = COLD_SHARE
    cold_min_tokens: int = COLD_MIN_TOKENS

    def __post_init__(self):
        by_key = {(r.layer, r.expert): r for r in self.experts}
        missing = sorted({key for key in self.expert_of.values() if tuple(key) not in by_key})
        if missing:
            raise ValueError(f"calibration set: expert weights of experts without a row: {missing[:5]}")
        self._row_of = {name: by_key[tuple(key)] for name, key in self.expert_of.items()}

    def weight_names(self) -> list[str]:
        return sorted(set(self.routes) | set(self.all_token_routes))

    def site_of(self, weight_name: str) -> str | None:
        """The site :meth:`stats` reads for ``weight_name`` (None when it has no statistics)."""
        row = self._row_of.get(weight_name)
        if row is not None and row.is_cold(self.cold_share, self.cold_min_tokens):
            site = self.all_token_routes.get(weight_name)
            if site in self.sites:
                return site
        site = self.routes.get(weight_name)
        return site if site in self.sites else None

    def site_stats(self, weight_name: str) -> SiteStats | None:
        site = self.site_of(weight_name)
        return None if site is None else self.sites[site]

    def stats(self, weight_name: str) -> CalibrationStats | None:
        """What the codec gets for ``weight_name``: Hessian [K, K], mean |x| [K] and the token count."""
        s = self.site_stats(weight_name)
        if s is None:
            return None
        return CalibrationStats(hessian=s.hessian, act_abs_mean=s.abs_mean, tokens=s.tokens)

    def cold_experts(self, threshold: float = COLD_SHARE, min_tokens: int = COLD_MIN_TOKENS) -> list[ExpertRow]:
        """Routed experts under ``threshold`` of their layer's tokens or under ``min_tokens`` tokens."""
        return [r for r in self.experts if r.is_cold(threshold, min_tokens)]

    def summary(self) -> dict:
        """Everything but the tensors, JSON-able: what ``stats.py`` writes to summary.json."""
        cold = self.cold_experts(self.cold_share, self.cold_min_tokens)
        covered = {tuple(self.expert_of[w]) for w, site in self.all_token_routes.items() if site in self.sites}
        return {
            "version": SUMMARY_VERSION,
            "info": dict(self.info),
            "cold_share": self.cold_share,
            "cold_min_tokens": self.cold_min_tokens,
            "cold_experts": [
                {"layer": r.layer, "expert": r.expert, "tokens": r.tokens, "share": r.share,
                 "all_token_stats": (r.layer, r.expert) in covered}
                for r in cold
            ],
            "experts": [dict(r.__dict__) for r in self.experts],
            "routers": {str(layer): s.to_json() for layer, s in sorted(self.routers.items())},
            "sites": {name: {"tokens": s.tokens, "k": s.k} for name, s in sorted(self.sites.items())},
            "routes": dict(sorted(self.routes.items())),
            "all_token_routes": dict(sorted(self.all_token_routes.items())),
            "expert_of": {name: list(key) for name, key in sorted(self.expert_of.items())},
        }
