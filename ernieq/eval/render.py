"""report.md and report.html from the report dict alone (``report.json``'s content).

Both renderings come from one list of blocks (headings, paragraphs, tables,
figures, code), so they always say the same thing. The HTML is self-contained:
inline CSS, figures as ``data:`` URIs, no scripts, no external links.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from ernieq.device import describe
from ernieq.eval.plots import data_uri
from ernieq.recipes import dump

TOP_EXPERTS = 10  # the worst routed experts listed by name

FIGURE_CAPTIONS = {
    "per_layer_error": "Weight SQNR per layer and tensor class (higher is better); with calibration statistics, "
                       "the relative output error on the calibration activations (lower is better).",
    "expert_error": "Weight SQNR of every routed expert (gate, up and down together).",
    "expert_load": "Expert load on the calibration text: share of the layer's token-expert assignments.",
    "ppl_vs_bits": "Perplexity against bits per weight (linear layers, every stored byte; log scale) of every "
                   "model scored.",
}


@dataclass(frozen=True)
class Block:
    """kind: h1, h2, p, table (head, rows), figure (name), code."""

    kind: str
    text: str = ""
    head: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()


def fmt_ppl(x: float) -> str:
    return f"{x:,.4f}"


def fmt_pct(x: float) -> str:
    return f"{100.0 * x:+.2f} %"


def fmt_share(x: float) -> str:
    return f"{100.0 * x:.2f} %"


def fmt_float(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def fmt_db(x: float | None) -> str:
    return "exact" if x is None else f"{x:.2f}"


def fmt_bits(x: float) -> str:
    return f"{x:.3f}"


def accuracy_table(report: dict) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """(head, rows): per corpus and model, tokens, perplexity, change against the baseline, KL, top-1.

    The model card shows exactly this table.
    """
    head = ("corpus", "model", "bits per weight", "tokens", "perplexity", "vs baseline",
            "KL (nats/token)", "top-1 agreement")
    bits = {s["label"]: s["bits_per_weight"] for s in report["settings"]}  # settings keep the order scored
    rows = []
    for c in report["perplexity"]:
        base = c["ppl"]["baseline"]
        for label in bits:
            ppl, is_base = c["ppl"][label], label == "baseline"
            rows.append((c["corpus"], label, fmt_bits(bits[label]), f"{c['tokens']:,}", fmt_ppl(ppl),
                         "" if is_base else fmt_pct(ppl / base - 1.0),
                         "" if is_base else fmt_float(c["kl_mean"][label]),
                         "" if is_base else fmt_share(c["top1_agreement"][label])))
    return head, rows


def fmt_metric(x: float | None, sign: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:{'+' if sign else ''}.4g}" if abs(x) >= 1e6 else f"{x:{'+' if sign else ''},.4f}"


TASK_NOTE = ("lm-evaluation-harness tasks, every model on the same examples. A difference to the baseline carries "
             "its standard error: for a mean over examples (acc) the paired one, from the per-example differences; "
             "for other metrics (perplexity) sqrt(se_baseline² + se_model²), marked unpaired.")


def task_table(report: dict) -> tuple[tuple[str, ...], list[tuple[str, ...]]] | None:
    """(head, rows): per task, metric and model, the examples, the value ± its standard error and the
    difference to the baseline ± its standard error; None when the report ran no tasks. The model
    card shows exactly this table."""
    section = report.get("tasks")
    if not section:
        return None
    head = ("task", "metric", "model", "examples", "value", "stderr", "vs baseline", "stderr of the difference")
    rows = []
    for r in section["rows"]:
        for label, value in r["value"].items():
            is_base = label == "baseline"
            se = "" if is_base else fmt_metric(r["diff_stderr"][label])
            if not is_base and not r["paired"][label] and r["diff_stderr"][label] is not None:
                se += " (unpaired)"
            rows.append((r["task"], r["metric"], label, str(r["samples"]), fmt_metric(value),
                         fmt_metric(r["stderr"][label]), "" if is_base else fmt_metric(r["diff"][label], sign=True),
                         se))
    return head, rows


def size_table(report: dict) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    head = ("class", "weights", "bytes (baseline)", "bytes (quantized)", "bits per weight")
    q, b = report["size"]["quantized"], report["size"]["baseline"]
    rows = [(cls, f"{row['weights']:,}", f"{b['classes'].get(cls, {}).get('bytes', 0):,}", f"{row['bytes']:,}",
             fmt_bits(row["bits_per_weight"])) for cls, row in q["classes"].items()]
    rows.append(("all", f"{q['weights']:,}", f"{b['bytes']:,}", f"{q['bytes']:,}", fmt_bits(q["bits_per_weight_all"])))
    return head, rows


def _error_rows(rows: list[dict], keys: tuple[str, ...]) -> list[tuple[str, ...]]:
    return [(*(str(r[k]) for k in keys), ", ".join(r["codecs"]), f"{r['weights']:,}", fmt_float(r["rel_fro"]),
             fmt_db(r["sqnr_db"]), fmt_float(r["output_rel_err"], 5)) for r in rows]


ERROR_HEAD = ("codecs", "weights", "relative Frobenius error", "SQNR (dB)", "relative output error")


ERROR_NOTE = (
    "What the figures measure. The weight error (relative Frobenius error, SQNR; the expert figure) compares "
    "the stored weights with the baseline's, every weight counted alike, whatever multiplies it. The relative "
    "output error weighs each weight's error by the calibration activations that multiply it: "
    "||X dW^T||² / ||X W^T||², the relative error of the module's output on the calibration tokens (a routed "
    "expert's: on the tokens routed to it), so input channels with large activations count for more. A row "
    "over several modules (a layer, a class, an expert) sums both energies over its modules before dividing: "
    "it is the share of their output energy that quantization changes, decided by the modules whose outputs "
    "carry the most energy, not an average of their figures.")
DOMINANT_SHARE = 0.5  # a module holding more of its layer's output energy than this decides the layer's figure


def _dominated_layers(err: dict) -> list[str]:
    """One sentence per layer where a single module holds most of the output energy, beside that layer's
    routed experts' own figure: why the layer's row can sit far below its experts'."""
    by_layer: dict[int, list[dict]] = {}
    for r in err["modules"]:
        if r.get("wh") and r["layer"] is not None:
            by_layer.setdefault(r["layer"], []).append(r)
    experts = {r["layer"]: r["output_rel_err"] for r in err["layer_classes"] if r["cls"] == "routed_experts"}
    out = []
    for layer, rows in sorted(by_layer.items()):
        top = max(rows, key=lambda r: r["wh"])
        share = top["wh"] / sum(r["wh"] for r in rows)
        if share > DOMINANT_SHARE and layer in experts:
            out.append(f"Layer {layer}: `{top['name']}` ({top['codec']}) holds {fmt_share(share)} of the output "
                       f"energy at a relative output error of {fmt_float(top['output_rel_err'], 5)}, so the layer's "
                       f"figure follows it; its routed experts' own is {fmt_float(experts[layer], 5)}.")
    return out


def blocks(report: dict, figures: set[str]) -> list[Block]:
    """The report as blocks, in order; ``figures`` names the plots that exist."""
    m, err, prov = report["model"], report["weight_error"], report["provenance"]
    q = report["size"]["quantized"]
    acc_head, acc_rows = accuracy_table(report)
    size_head, size_rows = size_table(report)
    out = [
        Block("h1", f"ernieq report: {m['quantized']}"),
        Block("p", f"Quantized checkpoint `{m['quantized']}` (recipe {m['recipe']}, method {m['method'] or 'rtn'}) "
                   f"against the baseline `{m['baseline']}` ({m['architecture']}): "
                   f"{fmt_bits(q['bits_per_weight_linear'])} bits per weight over the linear layers, "
                   f"{fmt_bits(q['bits_per_weight_all'])} over all weights."),
        Block("h2", "Accuracy"),
        Block("p", f"Perplexity over non-overlapping windows of {report['options']['seq_len']} tokens "
                   f"(at most {report['options']['max_windows'] or 'all'} per corpus), every model on the same windows; "
                   "KL divergence KL(baseline || model) and top-1 agreement of the next-token distributions "
                   "at the same positions."),
        Block("table", head=acc_head, rows=tuple(acc_rows)),
    ]
    if "ppl_vs_bits" in figures:
        out.append(Block("figure", "ppl_vs_bits"))
    tasks = task_table(report)
    if tasks is not None:
        opts = report["tasks"]["options"]
        shots = "each task's own shots" if opts["num_fewshot"] is None else f"{opts['num_fewshot']} shots"
        limit = f"the first {opts['limit']} examples" if opts["limit"] else "every example"
        out += [Block("h2", "Task accuracy"), Block("p", f"{TASK_NOTE} {limit.capitalize()} of each task, {shots}."),
                Block("table", head=tasks[0], rows=tuple(tasks[1]))]
    out += [Block("h2", "Size by tensor class"), Block("table", head=size_head, rows=tuple(size_rows))]
    if q["codecs"]:
        out.append(Block("table", head=("codec", "weights", "bytes", "bits per weight"),
                         rows=tuple((k, f"{v['weights']:,}", f"{v['bytes']:,}", fmt_bits(v["bits_per_weight"]))
                                    for k, v in q["codecs"].items())))
    out += [
        Block("h2", "Reconstruction error"),
        Block("p", "Relative Frobenius error ||W_hat - W|| / ||W||, SQNR 10 log10(||W||² / ||W_hat - W||²)"
                   + (f"; relative output error tr(dW H dW^T) / tr(W H W^T) with H = X^T X / n from the calibration "
                      f"statistics in `{err['calib']}`." if err["output_error"] else
                      "; no calibration statistics given (--calib), so no output error.")),
        Block("table", head=("class", *ERROR_HEAD), rows=tuple(_error_rows(err["classes"], ("cls",)))),
    ]
    if err["output_error"]:
        dominated = _dominated_layers(err)
        agree = (" Both figures are right where they disagree: the layer's says how much its outputs move, the "
                 "experts' how well each expert is kept. " + " ".join(dominated)) if dominated else ""
        out.append(Block("p", ERROR_NOTE + agree))
    if "per_layer_error" in figures:
        out.append(Block("figure", "per_layer_error"))
    out.append(Block("table", head=("layer", *ERROR_HEAD), rows=tuple(_error_rows(err["layers"], ("layer",)))))
    if err["experts"]:
        if "expert_error" in figures:
            out.append(Block("figure", "expert_error"))
        worst = sorted(err["experts"], key=lambda r: -r["rel_fro"])[:TOP_EXPERTS]
        out += [Block("p", f"The {len(worst)} routed experts with the largest weight error:"),
                Block("table", head=("layer", "expert", *ERROR_HEAD),
                      rows=tuple(_error_rows(worst, ("layer", "expert"))))]
    out += _calibration_blocks(report, figures)
    spec = m.get("recipe_spec")
    if spec:
        out += [Block("h2", "Recipe"),
                Block("p", "The recipe the checkpoint was made with, as it stores it (a recipe file: "
                           "`ernieq quantize MODEL --recipe FILE` makes the checkpoint again)."),
                Block("code", dump(spec).rstrip())]
    out += [
        Block("h2", "Provenance"),
        Block("code", prov["command"]),
        Block("p", f"commit {prov['commit']}, {prov['machine']}, started {prov['started']}, "
                   f"finished {prov['finished']}."),
    ]
    if report.get("runtime"):  # reports before the device options do not say
        out.append(Block("p", f"Computed on {describe(report['runtime'])}."))
    out.append(Block("table", head=("package", "version"), rows=tuple(sorted(prov["versions"].items()))))
    return out


def _calibration_blocks(report: dict, figures: set[str]) -> list[Block]:
    calib = report["calibration"]
    out = [Block("h2", "Calibration coverage")]
    if calib is None:
        used = report["model"].get("quantized_calibration")
        note = f" The checkpoint was calibrated on {used.get('data', 'unrecorded text')}." if used else ""
        return out + [Block("p", "No calibration statistics given (--calib DIR), so no expert table." + note)]
    info = calib["info"]
    cold = calib["cold_experts"]
    tokens = f"{info['tokens']:,}" if isinstance(info.get("tokens"), int) else "an unrecorded number of"
    out.append(Block("p", f"{tokens} tokens of {info.get('data', 'unrecorded text')}; "
                          f"{len(cold)} of {calib['routed_experts']} routed experts cold (under "
                          f"{fmt_share(calib['cold_share'])} of their layer's tokens or under "
                          f"{calib['cold_min_tokens']} tokens)."))
    if "expert_load" in figures:
        out.append(Block("figure", "expert_load"))
    if cold:
        out.append(Block("table", head=("layer", "expert", "tokens", "share"),
                         rows=tuple((str(r["layer"]), str(r["expert"]), f"{r['tokens']:,}", fmt_share(r["share"]))
                                    for r in cold)))
    return out


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(head: tuple[str, ...], rows) -> str:
    lines = ["| " + " | ".join(map(_md_cell, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: dict, figure_paths: dict[str, str]) -> str:
    """report.md; figures link to ``figure_paths`` (relative PNG paths)."""
    kinds = {
        "h1": lambda b: f"# {b.text}",
        "h2": lambda b: f"## {b.text}",
        "p": lambda b: b.text,
        "table": lambda b: markdown_table(b.head, b.rows),
        "figure": lambda b: f"![{b.text}]({figure_paths[b.text]})\n\n*{FIGURE_CAPTIONS[b.text]}*",
        "code": lambda b: f"```\n{b.text}\n```",
    }
    return "\n\n".join(kinds[b.kind](b) for b in blocks(report, set(figure_paths))) + "\n"


CSS = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:3px 8px}
th{background:#f2f2f2}td{text-align:right}td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}img{max-width:100%}figcaption{font-size:13px;color:#555}
pre{background:#f6f6f6;padding:8px;overflow-x:auto}code{background:#f6f6f6}"""


def _inline(text: str) -> str:
    """Escape, then `x` -> <code>x</code>."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(report: dict, images: dict[str, bytes]) -> str:
    """report.html: one file, figures embedded as base64 PNG."""
    def table(b: Block) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in b.head)
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in b.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"

    kinds = {
        "h1": lambda b: f"<h1>{_inline(b.text)}</h1>",
        "h2": lambda b: f"<h2>{_inline(b.text)}</h2>",
        "p": lambda b: f"<p>{_inline(b.text)}</p>",
        "table": table,
        "figure": lambda b: (f'<figure><img alt="{b.text}" src="{data_uri(images[b.text])}">'
                             f"<figcaption>{html.escape(FIGURE_CAPTIONS[b.text])}</figcaption></figure>"),
        "code": lambda b: f"<pre>{html.escape(b.text)}</pre>",
    }
    body = [kinds[b.kind](b) for b in blocks(report, set(images))]
    title = html.escape(f"ernieq report: {report['model']['quantized']}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>{CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
