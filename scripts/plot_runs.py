"""Plot training runs side by side from their metrics.jsonl, without writing code:

    python -m scripts.plot_runs runs/stage1-sft-5ep runs/stage2-redi runs/stage2-simpo --out runs/plots/runs.png

Panels: loss, learning rate, gradient norm (before clipping), the chosen and rejected log-probs, and
eval/pass@1 when a run evaluated during training (train.py --eval-steps). One colour per run in every panel.

Log-probs mean different things per stage (TRL's meanings; losses.py, train.stage_loss): `logps/chosen` and
`logps/rejected` are the *summed* log π(y|x) of a response for sft, redi and dpo (weighted logs
`logps/samples`, also summed), but the *per-token mean* log π(y|x)/|y| for simpo. A sum over a few thousand
tokens and a per-token mean differ by orders of magnitude and move differently, so they get separate panels,
each labelled, never one axis. The stage is the `stage` of each metrics.jsonl row.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
from common import InputError  # noqa: E402

SUMMED_STAGES = {"sft", "redi", "dpo", "weighted"}  # logps/* is Σ_t log π(y_t|...) per response
PER_TOKEN_STAGES = {"simpo"}  # logps/* is the mean over the response's tokens
LOGPS_KEYS = (("logps/chosen", "-", "chosen"), ("logps/rejected", "--", "rejected"), ("logps/samples", ":", "samples"))
# (title, y label, stages the panel applies to (None: all), metrics drawn with their line style and label)
PANELS = [("loss", "each run's own objective", None, [("loss", "-", "")]),
          ("learning rate", "learning_rate", None, [("learning_rate", "-", "")]),
          ("gradient norm", "grad_norm, before clipping", None, [("grad_norm", "-", "")]),
          ("log π(y|x), summed over the response", "logps (sft, redi, dpo, weighted)", SUMMED_STAGES, LOGPS_KEYS),
          ("log π(y|x) / |y|, mean per token", "logps (simpo)", PER_TOKEN_STAGES, LOGPS_KEYS),
          ("evaluation during training", "eval/pass@1", None, [("eval/pass@1", "o-", "")])]


def read_run(run_dir) -> tuple[str, list[dict]]:
    """A run's stage and metrics rows (RUN/metrics.jsonl, as train.py writes it)."""
    path = os.path.join(run_dir, "metrics.jsonl") if os.path.isdir(run_dir) else run_dir
    if not os.path.isfile(path):
        raise InputError(f"{run_dir}: no metrics.jsonl; pass train.py output directories (--out)")
    rows = [row for _, row in common.read_jsonl(path)]
    stages = {row.get("stage") for row in rows}
    if not rows or len(stages) != 1 or None in stages:
        raise InputError(f"{path}: needs rows of one run with a 'stage' (train.py writes it), found stages "
                         f"{sorted(map(str, stages))}")
    return stages.pop(), rows


def panel_lines(panel, runs) -> list[tuple]:
    """(run index, x, y, style, label) of every line one panel draws."""
    _, _, stages, keys = panel
    lines = []
    for i, (name, stage, rows) in enumerate(runs):
        if stages is not None and stage not in stages:
            continue
        for key, style, what in keys:
            points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
            if points:
                lines.append((i, *zip(*points), style, f"{name} ({stage})" + (f" {what}" if what else "")))
    return lines


def plot(run_dirs: list[str], out: str, names: list[str] | None = None) -> list[str]:
    """Draw the panels that have data into one PNG at `out` (atomically); returns the panel titles drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("matplotlib is not installed: make install (or .venv/bin/pip install matplotlib)") from None
    names = names or [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    runs = [(name, *read_run(d)) for name, d in zip(names, run_dirs)]
    drawn = [(panel, lines) for panel in PANELS if (lines := panel_lines(panel, runs))]
    columns = min(3, len(drawn))
    rows = -(-len(drawn) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, ((title, ylabel, _, _), lines) in zip(axes.flat, drawn):
        for run, x, y, style, label in lines:
            ax.plot(x, y, style, color=colours[run % len(colours)], label=label, markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(drawn):]:
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    common.atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)
    return [panel[0] for panel, _ in drawn]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.plot_runs", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="train.py output directories (each with metrics.jsonl)")
    p.add_argument("--out", default="runs/plots/runs.png", help="PNG to write (default: runs/plots/runs.png)")
    p.add_argument("--names", nargs="+", help="a legend name per run (default: each directory's name)")
    args = p.parse_args(argv)
    if args.names and len(args.names) != len(args.runs):
        raise InputError(f"--names: {len(args.names)} names for {len(args.runs)} runs; give one per run")
    drawn = plot(args.runs, args.out, args.names)
    print(f"wrote {args.out}: {', '.join(drawn)}")
    return 0


if __name__ == "__main__":
    common.cli(main, "plot_runs")
