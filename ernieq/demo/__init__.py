"""The offline demo MoE: SmolLM2-135M-Instruct rebuilt as an ERNIE 4.5 MoE checkpoint.

Layer 0 stays a dense MLP; every later layer becomes an ``Ernie4_5_MoeSparseMoeBlock``
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
  WikiText-2 test, first 12 windows of 2048: 25.22 against the dense 20.41 (1.24x),
  ``ernieq eval demo --data wikitext2 --max-windows 12``. E, k and S were chosen by
  such measurements: k=6 gave 1.5x (first 2 windows), k=7 without the refinement
  rounds and with 8192 calibration tokens 1.28x.

Both variants pad the hidden size 576 -> 640 and the heads 9 / 3 -> 12 / 4 with zero
channels and zero heads, exactly (``pad``), so every K and N is a multiple of 128 and
every export format takes the demo. The build writes the same bytes on every machine
and thread count: the routed plan is fitted in float64 (``mlp_inputs``, ``plan``) and
its router snapped to the bfloat16 grid (``router``); ``demo_recipe.json`` records the
weights' sha256.

One job per module: ``recipe`` (what decides the weights), ``cache`` (where builds
live), ``source`` (the dense GGUF model), ``mlp_inputs`` (what its MLPs see),
``cluster`` (neurons into experts), ``router`` (the router fit), ``plan`` (one MoE
layer from one dense MLP), ``pad`` (sizes to multiples of 128), ``convert`` (the
ERNIE checkpoint tensors and config), ``build`` (the folder, the cache entry and its copies).
This package stands above ``model`` and ``text``; nothing in ``model`` imports it.
"""

from ernieq.demo.build import build_demo_model, demo_model_path, write_demo_model
from ernieq.demo.recipe import DemoModelError, make_recipe
from ernieq.demo.source import DenseSource, load_dense_source

__all__ = ["DemoModelError", "DenseSource", "build_demo_model", "demo_model_path", "load_dense_source", "make_recipe",
           "write_demo_model"]
