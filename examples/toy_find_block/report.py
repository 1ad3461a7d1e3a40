"""The results table: test error per model and seed, and the mean per model.

    python -m examples.toy_find_block.report OUT_DIR

reads the per-run files OUT_DIR/<model>-seed<seed>.json (written by each run as it goes, so this
also works on the remains of killed runs), prints the table and writes OUT_DIR/results.md and
OUT_DIR/results.json.
"""

import argparse
import json
import sys
from pathlib import Path
from statistics import mean

from .files import write_json, write_text
from .models import MODELS


def load_runs(out_dir: Path, names: set[str] | None = None) -> list[dict]:
    """The run files in `out_dir` (those of `names` only, if given), baseline before MTA, then by seed."""
    runs = []
    for path in Path(out_dir).glob("*-seed*.json"):
        if names is not None and path.stem not in names:
            continue
        run = json.loads(path.read_text())
        if run.get("model") in MODELS:
            runs.append(run)
    return sorted(runs, key=lambda r: (MODELS.index(r["model"]), r["seed"]))


def latest_eval(run: dict) -> dict | None:
    return run["evals"][-1] if run["evals"] else None


def common_step(runs: list[dict]) -> int | None:
    """The last step at which every run was evaluated: the step to compare models at equal training."""
    shared = set.intersection(*(set(e["step"] for e in run["evals"]) for run in runs)) if runs else set()
    return max(shared) if shared else None


def summarize(runs: list[dict]) -> dict:
    rows = []
    for run in runs:
        last = latest_eval(run)
        rows.append(dict(
            model=run["model"], seed=run["seed"], status=run["status"], steps=run["step"],
            train_minutes=round(run["train_seconds"] / 60, 2),
            steps_per_second=round(run["step"] / run["train_seconds"], 2) if run["train_seconds"] else None,
            evaluated_step=last["step"] if last else None,
            error=last["error"] if last else None,
            wrong=last["wrong"] if last else None,
            examples=last["examples"] if last else None,
            device=run["device"],
        ))
    means = {}
    for model in MODELS:
        mine = [r for r in rows if r["model"] == model and r["error"] is not None]
        if mine:
            means[model] = dict(seeds=[r["seed"] for r in mine], error=mean(r["error"] for r in mine),
                                steps=round(mean(r["steps"] for r in mine)),
                                train_minutes=round(mean(r["train_minutes"] for r in mine), 2))
    step = common_step(runs)
    at_common_step = {}
    if step is not None:
        for model in MODELS:
            errors = [next(e["error"] for e in run["evals"] if e["step"] == step)
                      for run in runs if run["model"] == model]
            if errors:
                at_common_step[model] = dict(error=mean(errors), errors=errors)
    return dict(runs=rows, means=means, common_step=step, at_common_step=at_common_step)


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(summary: dict) -> str:
    lines = [
        "| model | seed | steps | train time | steps/s | test error (exact block match) | status |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in summary["runs"]:
        error = "not evaluated" if r["error"] is None else f"{_percent(r['error'])} ({r['wrong']}/{r['examples']})"
        if r["error"] is not None and r["evaluated_step"] != r["steps"]:
            error += f" at step {r['evaluated_step']:,}"
        lines.append(f"| {r['model']} | {r['seed']} | {r['steps']:,} | {r['train_minutes']:.1f} min | "
                     f"{r['steps_per_second'] or '-'} | {error} | {r['status']} |")
    for model, m in summary["means"].items():
        lines.append(f"| **{model} mean** | {len(m['seeds'])} seeds | {m['steps']:,} | {m['train_minutes']:.1f} min | "
                     f"| **{_percent(m['error'])}** | |")
    if summary["common_step"] is not None and len(summary["at_common_step"]) > 1:
        compared = ", ".join(
            f"{model} {_percent(m['error'])} ({' / '.join(_percent(e) for e in m['errors'])})"
            for model, m in summary["at_common_step"].items()
        )
        lines += ["", f"At equal training (step {summary['common_step']:,}, the last evaluation every run reached), "
                      f"mean test error: {compared}."]
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, names: set[str] | None = None) -> dict:
    """Summarize the run files of `out_dir` (of `names`, if given), print the table, write results.json and .md."""
    runs = load_runs(out_dir, names)
    if not runs:
        raise FileNotFoundError(f"no run files (<model>-seed<seed>.json) in {out_dir}")
    summary = summarize(runs)
    table = markdown(summary)
    write_json(Path(out_dir) / "results.json", summary)
    write_text(Path(out_dir) / "results.md", table)
    print(table, end="", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.toy_find_block.report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, help="the folder with the <model>-seed<seed>.json run files")
    args = parser.parse_args(argv)
    try:
        write_report(args.out_dir)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
