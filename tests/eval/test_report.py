"""ernieq report on a reduced demo: report.json's numbers against an independent computation."""

from __future__ import annotations

import importlib.metadata
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from ernieq import api
from ernieq.transforms import Rotation
from ernieq.calibration import load_stats
from ernieq.codecs import QuantizedTensor, get_codec
from ernieq.eval.perplexity import PerplexityError, perplexity, tokenize_text
from ernieq.eval.report import ReportError, read_report, score_corpus
from tests.eval.direct_tasks import direct_scores, examples
from tests.eval.report_case import MAX_WINDOWS, SEQ_LEN, TASK_LIMIT, report_case

REL = 1e-5  # the report and these checks run the same float32 forward passes; only sums differ in order


@pytest.fixture(scope="module")
def case(tmp_path_factory, demo_routed_dir, wikitext2_path):
    return report_case(tmp_path_factory, demo_routed_dir, wikitext2_path)


@pytest.fixture(scope="module")
def report(case):
    return read_report(case.report)


def _tensors(folder):
    """{name: tensor} of every safetensors file in ``folder``, read directly."""
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_perplexity_kl_and_top1_match_an_independent_computation(case, report):
    base_model, tokenizer = api.load(case.baseline, device="cpu")
    q_model, _ = api.load(case.q2, device="cpu")
    ids = tokenize_text(tokenizer, case.text.read_text())[0]
    (corpus,) = report["perplexity"]
    assert corpus["tokens"] == MAX_WINDOWS * (SEQ_LEN - 1)
    for label, model in (("baseline", base_model), ("quantized", q_model)):
        r = perplexity(model, ids, seq_len=SEQ_LEN, max_windows=MAX_WINDOWS, progress=False)
        assert r.tokens == corpus["tokens"]
        assert corpus["ppl"][label] == pytest.approx(r.ppl, rel=REL)
    windows = ids[: MAX_WINDOWS * SEQ_LEN].reshape(MAX_WINDOWS, SEQ_LEN)
    with torch.no_grad():
        p = torch.cat([base_model(w[None]).logits[0, :-1] for w in windows]).log_softmax(-1)  # [T, V]
        q = torch.cat([q_model(w[None]).logits[0, :-1] for w in windows]).log_softmax(-1)  # [T, V]
    kl = F.kl_div(q, p, log_target=True, reduction="batchmean").item()  # sum p (log p - log q) / T
    agree = (p.argmax(-1) == q.argmax(-1)).double().mean().item()
    assert corpus["kl_mean"]["quantized"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert corpus["top1_agreement"]["quantized"] == pytest.approx(agree, abs=1e-6)  # the report averages in float32
    assert 0 < corpus["kl_mean"]["q8"] < corpus["kl_mean"]["quantized"]  # wint8 stays closer than 2 bits


def test_task_table_matches_an_independent_computation(case, report):
    rows = {r["metric"]: r for r in report["tasks"]["rows"]}
    assert set(rows) == {"acc", "perplexity"}
    acc, ppl = rows["acc"], rows["perplexity"]
    assert acc["samples"] == TASK_LIMIT and set(acc["value"]) == {"baseline", "quantized", "q8"}
    pairs = [(r["context"], " " + r["target"]) for r in examples()[:TASK_LIMIT]]
    direct = {label: direct_scores(*api.load(path), pairs)
              for label, path in (("baseline", case.baseline), ("quantized", case.q2), ("q8", case.q8))}
    for label, (greedy, logprob) in direct.items():
        assert acc["value"][label] == sum(greedy) / TASK_LIMIT
        assert ppl["value"][label] == pytest.approx(math.exp(-sum(logprob) / TASK_LIMIT), rel=REL)
        if label == "baseline":
            continue
        d = [float(q) - float(b) for b, q in zip(direct["baseline"][0], greedy)]  # per-example differences
        mean = sum(d) / len(d)
        assert acc["diff"][label] == pytest.approx(mean, abs=1e-12)
        assert acc["diff_stderr"][label] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in d)
                                                                    / (len(d) - 1) / len(d)), abs=1e-12)
        assert acc["paired"][label] and not ppl["paired"][label]
        assert ppl["diff_stderr"][label] == pytest.approx(math.hypot(ppl["stderr"]["baseline"], ppl["stderr"][label]))
    md = (case.report / "report.md").read_text()
    assert "## Task accuracy" in md and "| wikitext2_lastword | acc | q8 |" in md


def test_weight_and_output_errors_match_an_independent_computation(case, report):
    base, stored = _tensors(case.baseline), _tensors(case.q2)
    modules = json.loads((case.q2 / "config.json").read_text())["quantization_config"]["modules"]
    cset = load_stats(case.calib)
    rows = {r["name"]: r for r in report["weight_error"]["modules"]}
    assert len(rows) == len(modules)
    checked = set()
    for name, row in rows.items():
        base_name = name[: -len(".weight")]
        spec = modules[base_name]
        if spec["codec"] in checked or base_name + ".weight" not in base:
            continue
        checked.add(spec["codec"])
        q = QuantizedTensor(spec["codec"], tuple(spec["shape"]),
                            {k[len(base_name) + 1:]: v for k, v in stored.items() if k.startswith(base_name + ".")},
                            spec["params"])
        w = base[base_name + ".weight"].double()
        w_hat = get_codec(spec["codec"], **spec["params"]).decode(q).double()
        if "rotation" in spec:  # stored turned by R: W_hat = decode R^T
            prefix = f"ernieq_rotations.{spec['rotation']}"
            rot = Rotation(stored[f"{prefix}.signs"].double(), stored[f"{prefix}.q"].double())
            w_hat = rot.apply_t(w_hat)
        dw = w_hat - w
        assert row["rel_fro"] == pytest.approx((torch.linalg.norm(dw) / torch.linalg.norm(w)).item(), rel=1e-5)
        assert row["sqnr_db"] == pytest.approx(-20 * math.log10(row["rel_fro"]), rel=1e-9)
        h = cset.stats(name).hessian.double()
        expect = (torch.trace(dw @ h @ dw.T) / torch.trace(w @ h @ w.T)).item()
        assert row["output_rel_err"] == pytest.approx(expect, rel=1e-4)
    assert checked == {"wint8", "wint4", "ccq2"}, checked
    layer1 = [r for r in rows.values() if r["layer"] == 1]
    (agg,) = [r for r in report["weight_error"]["layers"] if r["layer"] == 1]
    assert agg["rel_fro"] == pytest.approx(math.sqrt(sum(r["e2"] for r in layer1) / sum(r["w2"] for r in layer1)))
    experts = report["weight_error"]["experts"]
    assert {(r["layer"], r["expert"]) for r in experts} == {(r.layer, r.expert) for r in cset.experts}


def test_sizes_and_calibration_match_the_files(case, report):
    stored = _tensors(case.q2)
    size = report["size"]["quantized"]
    assert size["bytes"] == sum(t.numel() * t.element_size() for t in stored.values())
    routed = sum(t.numel() * t.element_size() for k, t in stored.items() if ".mlp.experts." in k)
    assert size["classes"]["routed_experts"]["bytes"] == routed
    assert set(size["classes"]) <= {"attention", "dense_mlp", "shared_experts", "routed_experts", "other"}
    baseline = report["size"]["baseline"]
    assert baseline["bits_per_weight_linear"] == pytest.approx(32.0)  # the demo is float32
    assert size["bits_per_weight_linear"] < 8.0 < report["settings"][2]["bits_per_weight"] < 8.2  # q2 < q8
    cset = load_stats(case.calib)
    tokens = {(r["layer"], r["expert"]): r["tokens"] for r in report["calibration"]["experts"]}
    assert tokens == {(r.layer, r.expert): r.tokens for r in cset.experts}
    assert len(report["calibration"]["cold_experts"]) == len(cset.cold_experts())


def test_report_files_and_provenance(case, report):
    text = (case.report / "report.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    for name in ("per_layer_error", "expert_error", "expert_load", "ppl_vs_bits"):
        png = (case.report / "plots" / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    html = (case.report / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    md = (case.report / "report.md").read_text()
    assert f"| {case.text} | quantized |" in md
    prov = report["provenance"]
    assert prov["versions"]["torch"] == importlib.metadata.version("torch")
    assert "report" in prov["command"] or prov["argv"]
    assert prov["commit"] and prov["started"] <= prov["finished"]
    runtime = report["runtime"]
    assert runtime["device"] == "cpu" and runtime["dtype"] == "float32"
    kernels = dict(part.split(": ", 1) for part in runtime["kernels"].split("; "))
    assert kernels["baseline"] == "torch"
    assert kernels["quantized"].startswith("reference, decode cache") and kernels["q8"].startswith("reference")
    assert runtime["decode_cache"]["limit_bytes"] >= runtime["decode_cache"]["cached_bytes"] >= 0
    assert f"Computed on cpu ({runtime['device_name']}), float32, kernels: baseline: torch" in md


def test_eval_json_records_the_runtime_and_the_decode_cache_changes_no_figure(case, tmp_path):
    results = {}
    for cache in ("off", "auto"):
        path = tmp_path / f"{cache}.json"
        api.evaluate(case.q2, str(case.text), seq_len=SEQ_LEN, max_windows=MAX_WINDOWS, progress=False,
                     json_path=path, device="cpu", decode_cache=cache)
        results[cache] = json.loads(path.read_text())
    off, auto = results["off"]["runtime"], results["auto"]["runtime"]
    assert off["device"] == auto["device"] == "cpu" and off["dtype"] == auto["dtype"] == "float32"
    assert off["kernels"] == "reference, decode cache off"
    assert auto["kernels"].startswith("reference, decode cache ") and auto["decode_cache"]["cached_bytes"] > 0
    assert math.isclose(results["off"]["ppl"], results["auto"]["ppl"], rel_tol=REL)


def test_score_corpus_refuses_a_text_shorter_than_one_window():
    class Zero(torch.nn.Module):
        def forward(self, input_ids):
            return torch.zeros(*input_ids.shape, 7)

    with pytest.raises(PerplexityError, match="no full window"):
        score_corpus({"baseline": Zero()}, torch.arange(5), "short", seq_len=8, max_windows=None, progress=False)


def test_read_report_names_a_missing_file(tmp_path):
    with pytest.raises(ReportError, match="report.json"):
        read_report(tmp_path)
