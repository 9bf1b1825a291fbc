"""What the model does on real text: per-expert statistics, and error-compensating rounding.

- ``collect_stats(model_path, token_ids [n_seq, seq_len], all_experts=...)`` runs the
  unquantized model layer by layer and returns a :class:`CalibrationSet`;
- ``save_stats`` / ``load_stats`` keep one on disk (``collect_stats(out=DIR)`` streams it there
  layer by layer; ``load_stats`` reads the tensors lazily);
- ``gptq_encode(codec, W [N, K], stats)`` rounds with GPTQ behind the codec interface.
"""

from ernieq.calibration.accumulate import RouterStats, SiteStats
from ernieq.calibration.calibset import COLD_MIN_TOKENS, COLD_SHARE, CalibrationSet, ExpertRow
from ernieq.calibration.collect import CalibrationError, collect_stats
from ernieq.calibration.gptq import gptq_encode, register_rounder
from ernieq.calibration.stats import StatsError, load_stats, save_stats

from ernieq.calibration import gptq_ccq2  # noqa: F401, E402  (registers the ccq2 rounder)

__all__ = [
    "COLD_MIN_TOKENS",
    "COLD_SHARE",
    "CalibrationError",
    "CalibrationSet",
    "ExpertRow",
    "RouterStats",
    "SiteStats",
    "StatsError",
    "collect_stats",
    "gptq_encode",
    "load_stats",
    "register_rounder",
    "save_stats",
]
