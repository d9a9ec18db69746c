"""The Space metadata, requirements.txt, pyproject.toml and .ci/run agree with each other and with what we test."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import gradio
import yaml
from packaging.requirements import Requirement

import studio
from studio.cli import methods_table

ROOT = Path(__file__).resolve().parents[1]


def _front_matter() -> dict:
    text = (ROOT / "README.md").read_text()
    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert match, "README.md must start with Hugging Face Space front matter"
    return yaml.safe_load(match.group(1))


def test_space_front_matter_matches_the_tested_gradio():
    fm = _front_matter()
    assert fm["sdk"] == "gradio"
    assert str(fm["sdk_version"]) == gradio.__version__
    assert fm["app_file"] == "app.py" and (ROOT / "app.py").is_file()
    assert fm["python_version"] and fm["short_description"] and fm["license"]
    assert len(fm["short_description"]) <= 60


def test_requirements_consistent_with_pyproject():
    deps = {Requirement(d).name.lower(): Requirement(d) for d in
            tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    reqs = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            r = Requirement(line)
            reqs[r.name.lower()] = r
    assert set(reqs) == set(deps)
    gr = reqs["gradio"]
    assert gr.specifier.contains(gradio.__version__) and deps["gradio"].specifier.contains(gradio.__version__)
    import torch

    assert deps["torch"].specifier.contains(torch.__version__.split("+")[0])


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme.split("## Quickstart", 1)[1], re.S)
    commands = [c.strip() for c in blocks[0].strip().splitlines() if c.strip() and not c.startswith("#")]
    assert len(commands) == 2, commands
    assert commands[1] in ci


def test_ci_installs_the_crosscheck_extra():
    """CI runs the FusionBench, mergekit and peft parity tests (they skip without them locally, and fail under
    CI=true), against the pinned versions."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert [str(Requirement(r)) for r in extras["crosscheck"]] == ["fusion-bench==0.2.33", "mergekit==0.1.5",
                                                                   "peft==0.21.2"]
    assert 'pip install -q -e ".[test,crosscheck]"' in (ROOT / ".ci" / "run").read_text()


def test_docs_table_is_generated_from_the_schemas():
    readme = (ROOT / "README.md").read_text()
    assert methods_table() in readme, "README methods table is stale: regenerate with `python -m studio methods`"


def test_cli_lists_methods():
    out = subprocess.run([sys.executable, "-m", "studio", "methods"], capture_output=True, text=True, check=True)
    assert "tsv_m" in out.stdout and "svc" in out.stdout
    assert studio.__version__


def test_the_app_refuses_a_bad_suite_in_one_line(tmp_path):
    """``python app.py --suite`` with a folder that is no suite: one line naming it and exit status 2, as the CLI's
    errors (it printed a traceback, the message at its end), before anything is served."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MERGE_STUDIO_SUITE", None)
    run = subprocess.run([sys.executable, str(ROOT / "app.py"), "--suite", str(tmp_path), "--port", "1"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and str(tmp_path) in lines[0], \
        run.stderr


def test_docs_table_rows_have_four_cells():
    """A literal '|' in a schema text (AlignMerge's |T|/4) must not split a markdown table cell."""
    for row in methods_table().splitlines():
        cells = re.split(r"(?<!\\)\|", row)[1:-1]
        assert len(cells) == 4, row


def test_the_readme_library_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """The README's Library block, executed verbatim (in a scratch folder: it writes packed.safetensors), does what
    its comments say: the merges keep the base's keys, the evaluation covers every task, and the packed file loads
    back against the base (the comment's `Compressed.load(path, base).reconstruct(...)`)."""
    readme = (ROOT / "README.md").read_text()
    block = re.findall(r"```python\n(.*?)```", readme.split("## Library", 1)[1], re.S)[0]
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(block, "README.md (Library)", "exec"), ns)
    suite, merged, result = ns["suite"], ns["merged"], ns["result"]
    assert set(merged) == set(suite.base) and set(result.accuracy) == set(suite.experts)
    assert str(result.avg_normalized) in capsys.readouterr().out
    again = studio.Compressed.load(tmp_path / "packed.safetensors", suite.base).reconstruct("digits")
    direct = ns["low_rank"].reconstruct("digits")
    assert set(again) == set(suite.base) and all(again[k].equal(direct[k]) for k in again)


def test_the_readme_command_line_examples_run_as_written(tmp_path, monkeypatch, capsys):
    """Every line of the README's Command line block that needs only the embedded suite, run as written (through
    the CLI's `main`, in a scratch folder where `assets` is the repository's): each ends with status 0 and writes
    what it names. The lines that need other checkpoints, the Hub, or minutes (leaderboard, bench, build-suite) are
    left out by name, so a new example is run unless it is added to that list."""
    from studio.cli import main

    readme = (ROOT / "README.md").read_text()
    block = re.findall(r"```bash\n(.*?)```", readme.split("## Command line", 1)[1], re.S)[0]
    commands = [shlex.split(c, comments=True) for c in block.replace("\\\n", " ").splitlines()]
    commands = [c for c in commands if c and c[0] == "merge-studio"]
    elsewhere = ("base.safetensors", "owner/base-repo", "base_folder")
    minutes = ("leaderboard", "bench", "build-suite")
    runnable = [c[1:] for c in commands if not any(w in c for w in elsewhere) and c[1] not in minutes]
    assert len(runnable) == len(commands) - 6, [c[1] for c in commands]
    (tmp_path / "assets").symlink_to(ROOT / "assets")
    monkeypatch.chdir(tmp_path)
    for argv in runnable:
        assert main(argv) == 0, argv
        out = argv[argv.index("--out") + 1] if "--out" in argv else None
        assert out is None or (tmp_path / out).is_file(), argv
    capsys.readouterr()


def _anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a file's headings: lower case, punctuation but ``-`` and ``_`` dropped, spaces to
    ``-``, a repeated heading's anchor suffixed ``-1``, ``-2``, ... (code blocks hold no headings)."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.S), re.M):
        anchor = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(anchor, 0)
        seen[anchor] = n + 1
        out.add(anchor if n == 0 else f"{anchor}-{n}")
    return out


def test_the_docs_links_lead_somewhere():
    """Every relative link in the README, the changelog and docs/ names a file that exists and, with ``#anchor``, a
    heading of that file (the README's details live in docs/ENGINE.md and docs/PERFORMANCE.md, linked by section)."""
    pages = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken
    assert len(pages) >= 5


def test_every_mutant_of_the_mutation_tool_applies_to_the_code():
    """tools/mutation.py replaces one text per mutant; each must occur exactly once in its file, so the audit does not
    go stale silently as the code changes (the tool itself reports a stale mutant and exits 1)."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from mutants import MUTANTS
    finally:
        sys.path.remove(str(ROOT / "tools"))
    ids = [m[0] for m in MUTANTS]
    assert len(ids) == len(set(ids))
    for mid, path, text, replacement, what, *equivalent in MUTANTS:
        assert (ROOT / path).read_text().count(text) == 1, (mid, path)
        assert replacement != text and what and len(equivalent) <= 1, mid
