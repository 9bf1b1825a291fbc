"""report.md / report.html from a report dict; the HTML rendered by headless Chromium when installed."""

from __future__ import annotations

import io
import math
import re
import shutil
import subprocess

import pytest

from ernieq.eval.plots import report_plots
from ernieq.eval.render import accuracy_table, markdown_table, render_html, render_markdown

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def fake_report() -> dict:
    """A small report in report.json's schema: 2 layers, 3 experts, 2 corpora, one --compare model."""
    def err(rel, out=None):
        return {"rel_fro": rel, "sqnr_db": -20 * math.log10(rel), "output_rel_err": out,
                "codecs": ["ccq2"], "weights": 1000, "modules": 3}

    experts = [{"layer": layer, "expert": e, **err(0.1 + 0.02 * e + 0.05 * layer, 0.01 * (e + 1))}
               for layer in (1, 2) for e in range(3)]
    corpus = lambda name, q: {"corpus": name, "tokens": 4088, "windows": 2, "seq_len": 2048,  # noqa: E731
                              "ppl": {"baseline": 20.0, "quantized": q, "w8": 20.1},
                              "nll_mean": {}, "kl_mean": {"quantized": 0.31, "w8": 0.002},
                              "top1_agreement": {"quantized": 0.71, "w8": 0.985}}
    size = {"classes": {"attention": {"weights": 1000, "bytes": 1008, "bits_per_weight": 8.064},
                        "routed_experts": {"weights": 3000, "bytes": 900, "bits_per_weight": 2.4},
                        "other": {"weights": 500, "bytes": 2000, "bits_per_weight": 32.0}},
            "weights": 4500, "bytes": 3908, "bits_per_weight_all": 6.948, "bits_per_weight_linear": 3.8,
            "codecs": {"ccq2": {"weights": 3000, "bytes": 900, "bits_per_weight": 2.4}}}
    return {
        "schema": 1,
        "model": {"quantized": "q2/", "baseline": "demo", "baseline_path": "/x/demo", "recipe": "w2",
                  "method": "rtn", "quantized_calibration": None, "architecture": "Ernie4_5_MoeForCausalLM"},
        "perplexity": [corpus("wikitext2", 44.5), corpus("demo", 30.25)],
        "weight_error": {"modules": [], "calib": "calib/", "output_error": True,
                         "layers": [{"layer": 1, **err(0.1, 0.01)}, {"layer": 2, **err(0.2, 0.03)}],
                         "layer_classes": [{"layer": layer, "cls": c, **err(r, r / 10)} for layer in (1, 2)
                                           for c, r in (("attention", 0.01), ("routed_experts", 0.2 * layer))],
                         "experts": experts, "classes": [{"cls": "attention", **err(0.01, 0.001)}]},
        "size": {"quantized": size, "baseline": {**size, "bytes": 18000}},
        "calibration": {"info": {"tokens": 4096, "data": "demo"}, "cold_share": 0.005, "cold_min_tokens": 128,
                        "routed_experts": 6, "cold_experts": [{"layer": 2, "expert": 1, "tokens": 3, "share": 0.001}],
                        "experts": [{"layer": r["layer"], "expert": r["expert"], "tokens": 100 * (r["expert"] + 1),
                                     "share": 0.1, "load_share": (r["expert"] + 1) / 6, "mean_prob": 0.3}
                                    for r in experts]},
        "settings": [{"label": "baseline", "bits_per_weight": 32.0, "ppl": {"wikitext2": 20.0, "demo": 20.0}},
                     {"label": "quantized", "bits_per_weight": 3.8, "ppl": {"wikitext2": 44.5, "demo": 30.25}},
                     {"label": "w8", "bits_per_weight": 8.06, "ppl": {"wikitext2": 20.1, "demo": 20.1}}],
        "options": {"data": ["wikitext2", "demo"], "seq_len": 2048, "max_windows": 2, "compare": ["w8/"]},
        "provenance": {"command": "ernieq report q2/ --baseline demo --data wikitext2,demo", "argv": [],
                       "versions": {"ernieq": "0.1.0", "torch": "2.13.0"}, "commit": "abc123",
                       "machine": "Linux x86_64", "started": "2026-11-29T00:00:00+00:00",
                       "finished": "2026-11-29T00:01:00+00:00"},
    }


@pytest.fixture(scope="module")
def rendered():
    report = fake_report()
    images = report_plots(report)
    return report, images, render_markdown(report, {n: f"plots/{n}.png" for n in images}), render_html(report, images)


def test_accuracy_table_rows_carry_the_report_numbers():
    head, rows = accuracy_table(fake_report())
    assert head[4] == "perplexity" and len(rows) == 6  # 2 corpora x 3 models
    by = {(r[0], r[1]): r for r in rows}
    assert by[("wikitext2", "quantized")][4:] == ("44.5000", "+122.50 %", "0.3100", "71.00 %")
    assert by[("demo", "w8")][2] == "8.060"
    assert by[("demo", "baseline")][5:] == ("", "", "")


def test_markdown_holds_every_section_and_table(rendered):
    report, images, md, _ = rendered
    head, rows = accuracy_table(report)
    assert markdown_table(head, rows) in md
    for section in ("## Accuracy", "## Size by tensor class", "## Reconstruction error", "## Calibration coverage",
                    "## Provenance"):
        assert section in md
    assert set(images) == {"per_layer_error", "expert_error", "expert_load", "ppl_vs_bits"}
    for name in images:
        assert f"](plots/{name}.png)" in md
    assert "| 2 | 1 | 3 | 0.10 % |" in md  # the cold expert


def test_html_is_self_contained(rendered):
    _, images, _, page = rendered
    assert page.count("data:image/png;base64,") == len(images) == 4
    assert not re.search(r"(src|href)=\"(?!data:)", page)  # no file or network reference
    assert "<script" not in page
    assert "<td>44.5000</td>" in page


def _browser() -> str | None:
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def test_html_renders_in_headless_chromium(rendered, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip(f"no headless browser on PATH ({', '.join(BROWSERS)}): apt-get install chromium to run this")
    page = tmp_path / "report.html"
    page.write_text(rendered[3])
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={shot}",
           "--window-size=1100,2400", page.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("L")
    assert img.size == (1100, 2400)
    lo, hi = img.getextrema()
    assert hi - lo > 100  # text and figures, not a blank page
    assert len(set(img.resize((64, 128)).getdata())) > 20


def test_plot_ticks_are_plain_numbers_and_log_axes_say_so(monkeypatch):
    """No '3.4×10¹' or offset tick labels; an axis on a log scale names it in its label."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from ernieq.eval import plots

    figures = {}
    for name, fn in plots.PLOTS.items():
        monkeypatch.setattr(plots, "_png", lambda fig, name=name: figures.setdefault(name, fig) and b"")
        fn(fake_report())
    assert {"per_layer_error", "ppl_vs_bits"} <= set(figures)
    for name in ("per_layer_error", "ppl_vs_bits"):
        FigureCanvasAgg(figures[name]).draw()
        for ax in figures[name].axes:
            for axis, scale, label in ((ax.xaxis, ax.get_xscale(), ax.get_xlabel()),
                                       (ax.yaxis, ax.get_yscale(), ax.get_ylabel())):
                ticks = [t.get_text() for t in axis.get_ticklabels(which="both") if t.get_text()]
                assert all(re.fullmatch(r"-?\d+(\.\d+)?", t) for t in ticks), (name, ticks)
                assert axis.get_offset_text().get_text() == ""
                assert scale == "linear" or "log scale" in label or not label, (name, label)
    assert figures["ppl_vs_bits"].axes[0].get_yscale() == "linear"


def test_the_report_says_what_each_error_measures_and_which_module_decides_a_layer():
    report = fake_report()
    module = lambda layer, name, codec, wh, out: {"name": f"model.layers.{layer}.mlp.{name}.weight",  # noqa: E731
                                                  "layer": layer, "codec": codec, "wh": wh, "output_rel_err": out}
    report["weight_error"]["modules"] = [
        module(1, "experts.0.down_proj", "ccq2", 100.0, 0.1), module(1, "experts.1.down_proj", "ccq2", 100.0, 0.1),
        module(2, "shared_experts.down_proj", "wint8", 900.0, 1e-5),
        module(2, "experts.0.down_proj", "ccq2", 100.0, 0.1),
    ]
    md = render_markdown(report, {})
    assert "What the figures measure. The weight error" in md and "the share of their output energy" in md
    assert ("Layer 2: `model.layers.2.mlp.shared_experts.down_proj.weight` (wint8) holds 90.00 % of the output energy "
            "at a relative output error of 0.00001, so the layer's figure follows it; its routed experts' own is "
            "0.04000.") in md
    assert "Layer 1:" not in md
    report["weight_error"]["output_error"] = False
    assert "What the figures measure" not in render_markdown(report, {})
