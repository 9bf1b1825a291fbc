"""What the external peer scripts (``llmc_peer.py``, ``autoround_peer.py``) share: their common
arguments, the model and calibration tokens as ernieq gives them, and ernieq's perplexity protocol on
the model a peer returns. They run in the peer's own environment, which sees ernieq (``peers.py``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def peer_parser(doc: str | None) -> argparse.ArgumentParser:
    """The arguments ``peers.py`` passes every external peer; a script adds its own before parsing."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--data", required=True)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--calib-data", default="demo")
    p.add_argument("--calib-tokens", type=int, default=64 * 512)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--out", type=Path, required=True)
    return p


def load_for_peer(a: argparse.Namespace):
    """(checkpoint folder, tokenizer, float32 transformers model, calibration ids [n_seq, seq_len])."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ernieq import api

    path = api.resolve_model(a.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, tokenizer, model, api.calibration_tokens(path, a.calib_data, a.calib_tokens, a.calib_seq_len)


def peer_perplexity(model: torch.nn.Module, tokenizer, a: argparse.Namespace) -> dict:
    """ernieq's perplexity of ``model`` on ``--data``: the row's ppl, tokens, windows, seq_len, eval_seconds."""
    from ernieq.eval.perplexity import perplexity, tokenize_text
    from ernieq.text import load_text

    ids = tokenize_text(tokenizer, load_text(a.data, split="eval"))
    start = time.perf_counter()
    with torch.inference_mode():
        r = perplexity(model.eval(), ids, seq_len=a.seq_len, max_windows=a.max_windows, progress=False)
    return {"ppl": r.ppl, "tokens": r.tokens, "windows": r.windows, "seq_len": r.seq_len,
            "eval_seconds": time.perf_counter() - start}
