"""The Space metadata, requirements.txt, pyproject.toml and .ci/run agree with each other and with what we test."""

from __future__ import annotations

import re
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
    """CI runs the FusionBench and mergekit parity tests (they skip without them locally, and fail under CI=true)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert [str(Requirement(r)) for r in extras["crosscheck"]] == ["fusion-bench==0.2.33", "mergekit==0.1.5"]
    assert 'pip install -q -e ".[test,crosscheck]"' in (ROOT / ".ci" / "run").read_text()


def test_docs_table_is_generated_from_the_schemas():
    readme = (ROOT / "README.md").read_text()
    assert methods_table() in readme, "README methods table is stale: regenerate with `python -m studio methods`"


def test_cli_lists_methods():
    out = subprocess.run([sys.executable, "-m", "studio", "methods"], capture_output=True, text=True, check=True)
    assert "tsv_m" in out.stdout and "svc" in out.stdout
    assert studio.__version__


def test_docs_table_rows_have_four_cells():
    """A literal '|' in a schema text (AlignMerge's |T|/4) must not split a markdown table cell."""
    for row in methods_table().splitlines():
        cells = re.split(r"(?<!\\)\|", row)[1:-1]
        assert len(cells) == 4, row
