"""The README's "What it does" commands run as written, in order, from an empty folder.

The demo is the reduced test build (``DEMO_TEST_LAYERS`` decoder layers), handed out by
``demo-model --out demo/`` as the cached build is; after that command, ``demo`` names the local
``./demo`` as the README says. What the commands cost is cut down by these substitutions, and
nothing else is changed:

- ``--max-windows N`` scores one window of 64 tokens; ``--limit N`` takes 2 task examples;
- ``--calib-data demo`` and the README's recipe file (written as ``my-recipe.yaml``, the name the
  README uses) calibrate on 512 tokens in windows of 128;
- ``[--tp 4]``, an optional argument, is left out.

About 4 minutes of CPU (17 commands; lm-eval and two calibrations the most), so ``slow``: ``pytest -m slow``.
"""

from __future__ import annotations

import re
import shlex
import shutil

import pytest

from tests.conftest import REPO
from tests.test_cli import run

SUBSTITUTIONS = (
    (r"--max-windows \d+", "--max-windows 1 --seq-len 64"),
    (r"--limit \d+", "--limit 2"),
    (r"--calib-data demo", "--calib-data demo --calib-tokens 512 --calib-seq-len 128"),
    (r" \[--tp \d+\]", ""),
)


def readme_block(heading: str, lang: str) -> str:
    """The first ``lang`` code block under the README's ``## heading``."""
    section = (REPO / "README.md").read_text().split(f"## {heading}\n", 1)[1]
    return re.search(rf"```{lang}\n(.*?)```", section, re.S).group(1)


def readme_commands() -> list[list[str]]:
    """Every ``ernieq`` command of "What it does", in order, substituted, comments and ``&&`` split off."""
    commands = []
    for line in readme_block("What it does", "bash").splitlines():
        for old, new in SUBSTITUTIONS:
            line = re.sub(old, new, line)
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            commands.append(words[:cut])
            words = words[cut + 1:]
    return commands


@pytest.mark.slow
def test_the_readme_commands_run_in_order(demo_routed_dir, wikitext2_path, tmp_path, monkeypatch, capsys):
    from ernieq.demo import build

    monkeypatch.setenv("ERNIEQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ERNIEQ_WIKITEXT2", str(wikitext2_path))
    monkeypatch.setattr(build, "build_demo_model", lambda out, **_: shutil.copytree(demo_routed_dir, out))
    monkeypatch.chdir(tmp_path)
    recipe = readme_block("Recipes", "yaml").replace("tokens: 32768, seq_len: 512", "tokens: 512, seq_len: 128")
    (tmp_path / "my-recipe.yaml").write_text(recipe)
    commands = readme_commands()
    assert commands[0][:2] == ["ernieq", "demo-model"] and len(commands) >= 15
    for words in commands:
        assert words[0] == "ernieq", words
        code, _, err = run(monkeypatch, capsys, *words[1:])
        assert code == 0, f"{shlex.join(words)}: {err.strip().splitlines()[-1:]}"
    assert (tmp_path / "demo" / "config.json").is_file() and (tmp_path / "q2.json").is_file()
