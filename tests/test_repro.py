"""The README's "Reproducing the paper" section, run command by command at toy scale (scripts/repro_toy.py
reads the commands from README.md itself), from an empty directory to a Table-1-shaped results table.

What it proves: every command of the section runs (only the install and the model / raw-trace downloads are
substituted, by name); the section trains Stage 1 for both 3 and 5 epochs and every Stage 2 recipe, from the
start each recipe names; it evaluates both Table 1 rows on the five benchmarks; the table it ends with holds
each evaluation's pass@1 ± SEM; the tracked run wrote TensorBoard events and eval/ scores; the plot exists.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts import repro_toy  # noqa: E402

pytestmark = pytest.mark.skipif(not os.path.isdir(repro_toy.SHARED), reason="needs ../shared/data")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("repro") / "clone"
    commands = repro_toy.run_readme(str(work), steps=1, problems=16, per_benchmark=2)
    torch.set_num_threads(threads)
    return work, commands


def test_every_command_of_the_section_runs_and_only_the_downloads_are_substituted(toy):
    work, commands = toy
    assert commands == repro_toy.readme_commands()
    substituted = [c for c in commands if c.startswith(repro_toy.SUBSTITUTED)]
    assert [c.split()[0] for c in substituted] == ["make", ".", "hf", "python"]
    expanded = [one for c in commands if c not in substituted for one in repro_toy.expand_loops(c)]
    for recipe in ("stage1-sft-5ep", "stage1-sft-3ep", "stage2-redi", "stage2-redi-ablation",
                   "stage2-redi-symmetric", "stage2-dpo", "stage2-simpo", "stage2-weighted"):
        assert any(f"--config recipes/{recipe}.json" in c for c in expanded), recipe
        out = json.loads((ROOT / "recipes" / f"{recipe}.json").read_text())["out"]
        assert (work / out / "config.json").exists() and (work / out / "metrics.jsonl").exists()
    assert (work / "data" / "report.json").exists() and (work / "benchmarks" / "olympiadbench.jsonl").exists()


def test_the_section_ends_in_a_table_1_shaped_table_of_its_evaluations(toy):
    work, _ = toy
    lines = (work / "runs" / "results.md").read_text().splitlines()
    assert lines[0] == "| model | MATH-500 | AIME24 | AMC23 | Minerva | OlympiadBench | Avg. |"
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]] for line in lines[2:4]}
    assert set(rows) == {"stage1-sft-5ep", "stage2-redi"}
    for model, cells in rows.items():
        for cell, bench in zip(cells, ("math500", "aime24", "amc23", "minerva", "olympiadbench")):
            summary = json.loads((work / "runs" / "eval" / model / bench / "summary.json").read_text())
            assert summary["settings"]["protocol"] == "redi" and summary["problems"] == 2
            assert cell == f"{100 * summary['pass@1']:.1f} ± {100 * summary['pass@1_stderr']:.1f}"


def test_the_tracked_run_and_the_plot(toy):
    work, _ = toy
    redi = work / "runs" / "stage2-redi"
    assert list((redi / "tensorboard").glob("events.out.tfevents.*"))
    rows = [json.loads(line) for line in (redi / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["stage"] == "redi" and "eval/pass@1" in rows[-1]
    assert (work / "runs" / "plots" / "runs.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("text, message", [("{\"problem\": 1}", "expected a non-empty JSON list"),
                                           ("[]", "expected a non-empty JSON list"),
                                           ("[{\"problem\": \"p\"}]", "item 0 lacks 'problem' or 'answer'"),
                                           ("[1, 2", "not JSON")])
def test_a_downloaded_benchmark_of_another_shape_is_refused(text, message):
    from common import InputError
    from scripts import fetch_data

    with pytest.raises(InputError, match=message):
        fetch_data.problems_jsonl(text, "URL")
