"""Readable outputs of a run: summary.md and curves.png (global and per-site Dice per round)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from fl_common.replies import NOISE
from fl_server.lines import latest


def read_metrics(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def write_reports(run: Path, summary: dict[str, Any], mode: str) -> None:
    lines = read_metrics(run)
    initial = [{"round": 0, **summary["initial"]}] if summary.get("initial") else []
    rows = ["| round | Dice | mIoU | Acc | loss |", "|---|---|---|---|---|"]
    rows += [f"| {x['round'] or 'initial'} | {fmt(x['dice'])} | {fmt(x['miou'])} | "
             f"{fmt(x['acc'])} | {fmt(x['loss'])} |" for x in initial + lines]
    last = lines[-1] if lines else {"sites": {}}
    epsilon = summary.get("epsilon", {})  # DP-SGD: each site's cumulative epsilon
    sigma = latest(lines, NOISE)  # and the noise multiplier of its latest training
    dp_columns = (" ε | σ |", "---|---|") if epsilon else ("", "")
    site_rows = ["| site | Dice | mIoU | Acc | training examples |" + dp_columns[0],
                 "|---|---|---|---|---|" + dp_columns[1]]
    site_rows += [f"| {name} | {fmt(v.get('dice'))} | {fmt(v.get('miou'))} | {fmt(v.get('acc'))}"
                  f" | {v.get('num-examples', '')} |"
                  + (f" {fmt(epsilon.get(name))} | {fmt(sigma.get(name))} |"
                     if epsilon else "")
                  for name, v in last["sites"].items()]
    best = summary.get("best") or {}
    text = [f"# {mode.capitalize()} run", "", f"Rounds: {len(lines)}; best Dice "
            f"{fmt(best.get('dice'))} in round {best.get('round')}.", "",
            "## Global model on the sites' validation splits (pooled confusion matrix)", "",
            *rows, "", "## Per site, last round", "", *site_rows, ""]
    (run / "summary.md").write_text("\n".join(text))
    plot_curves(initial + lines, run / "curves.png", mode)


def plot_curves(lines: list[dict[str, Any]], path: Path, title: str) -> None:
    """Dice per round; round 0, when present, is the initial model."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    rounds = [x["round"] for x in lines]
    for site in sorted({s for x in lines for s in x["sites"]}):
        ax.plot(rounds, [x["sites"].get(site, {}).get("dice") for x in lines], lw=1, alpha=0.6,
                marker=".", label=site)
    ax.plot(rounds, [x["dice"] for x in lines], color="black", lw=2.5, marker="o",
            label="global (pooled)")
    ax.set(xlabel="round", ylabel="validation Dice", title=f"{title}: Dice per round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


HELD_EQUAL = {"epochs": "the same local epochs over the pooled data as each site runs on its own "
                        "(FLamby)",
              "steps": "as many optimiser steps as one (the mean) site takes: the length of the "
                       "global model's trajectory",
              "examples": "as many training examples as all sites see together"}


def budget_notes(budget: dict[str, Any] | None) -> list[str]:
    """What the centralized model's budget held equal to the federation, in words."""
    if not budget:
        return []
    sites = budget["site_steps_per_round"]
    return ["", f"Budget (`--budget {budget['held_equal']}`): per round, the centralized model "
            f"took {budget['steps_per_round']} optimiser steps ({budget['examples_per_round']} "
            f"examples), {HELD_EQUAL[budget['held_equal']]}. Each federated site took "
            f"{', '.join(f'{n} {v}' for n, v in sites.items())} steps per round, "
            f"{budget['site_examples_per_round']} examples in all; each local model takes its "
            "site's own steps. Every mode follows the same learning-rate schedule over the run."]


def write_comparison(out: Path, results: dict[str, dict[str, Any]]) -> None:
    """comparison.md (final and best Dice per mode) and comparison.png (Dice per round)."""
    rows = ["| mode | final Dice | final mIoU | best Dice (round) |", "|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mode, summary in results.items():
        final, best = summary.get("final") or {}, summary.get("best") or {}
        rows.append(f"| {mode} | {fmt(final.get('dice'))} | {fmt(final.get('miou'))} | "
                    f"{fmt(best.get('dice'))} ({best.get('round', '-')}) |")
        lines = read_metrics(out / mode)
        ax.plot([x["round"] for x in lines], [x["dice"] for x in lines], marker="o", label=mode)
    notes = ["", "federated and centralized: one model, Dice of the pooled confusion matrix over "
             "every site's validation split. local: each site's own model on its own split, "
             "mean over sites; `local/summary.json` has the cross-site matrix.",
             *budget_notes(results.get("centralized", {}).get("budget"))]
    local = results.get("local", {}).get("cross_site_dice")
    if local:
        names = list(local)
        notes += ["", "Local models (rows) on every site's validation split (columns), Dice:", "",
                  "| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        notes += [f"| {a} | " + " | ".join(fmt(local[a][b]) for b in names) + " |" for a in names]
    (out / "comparison.md").write_text("\n".join(["# Federated vs centralized vs local", "",
                                                  *rows, *notes, ""]))
    ax.set(xlabel="round", ylabel="validation Dice", title="Federated vs centralized vs local")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=110)
    plt.close(fig)
