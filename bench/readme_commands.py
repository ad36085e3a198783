"""The README's commands that no test runs, each run as written, in order, in a fresh folder.

Each command is quoted below and looked up in README.md before anything runs: a command the
README no longer shows stops the script, naming it. Two stand-ins are made for what a reader
brings, both from the synthetic generator: ``data/plagh`` (a hospital's site folder) and
``BCSS/`` (the BCSS release's layout: ``images/``, ``masks/`` with BCSS codes, TCGA names).
``egcmf train`` is stopped with Ctrl-C once it has saved its first epoch, as a crash would stop
it, so that the README's ``--resume`` line has a run to continue. The GPU line is expected to run
on a machine with a GPU and to be refused in one line on one without. The main job and
``--compare`` are run by ``bench/main_job.sh``, the federation and the first slide commands by
the tests.

    python bench/readme_commands.py                  # about 25 minutes on 2 CPU cores
    python bench/readme_commands.py --only synth check-site train resume evaluate

Prints one line per command (exit status, seconds, what it reports), then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


@dataclass(frozen=True)
class Step:
    name: str
    command: str  # as the README shows it
    extra: str = ""  # appended to the README's command (its optional "[--json]")
    stop_when: str = ""  # Ctrl-C once this file exists


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


STEPS = [
    Step("synth", "egcmf synth --out data/synthetic --sites 5 --rois-per-site 12 --size 256 "
                  "--seed 0 --preview"),
    Step("check-site", "egcmf check-site data/synthetic/site_01"),
    Step("check-sites", "egcmf check-site data/synthetic"),
    Step("data-summary", "egcmf data-summary --data data/synthetic --partition dirichlet "
                         "--clients 4 --alpha 0.3 --json"),
    Step("train", "egcmf train --data data/synthetic --epochs 20 --out runs/central",
         stop_when="runs/central/last.pt"),
    Step("resume", "egcmf train --data data/synthetic --out runs/central --resume"),
    Step("evaluate", "egcmf evaluate --checkpoint runs/central/best.pt --data data/synthetic "
                     "--split test"),
    Step("evaluate-json", "egcmf evaluate --checkpoint runs/central/best.pt --data "
                          "data/synthetic --split test", extra=" --json"),
    Step("predict", "egcmf predict --checkpoint runs/central/best.pt --he he.png --ck56 ck56.png "
                    "--out pred/"),
    Step("profile", "egcmf profile --preset paper --variant full"),
    Step("profile-json", "egcmf profile --preset paper --variant full", extra=" --json"),
    Step("label-skew", "python sim/run.py --partition dirichlet --alpha 0.3 --clients 4"),
    Step("your-sites", "python sim/run.py --dataset sites --data data/plagh --partition iid "
                       "--clients 4"),
    Step("bcss-summary", "egcmf data-summary --dataset bcss --data BCSS/ --partition "
                         "institution --json"),
    Step("bcss", "python sim/run.py --dataset bcss --data BCSS/ --partition institution"),
    Step("gpu", "python sim/run.py --preset paper --client-gpus 0.5 --clients 4"),
    Step("synth-slides", "egcmf synth-slides --out slides --size 2048"),
    Step("predict-wsi", "egcmf predict-wsi --checkpoint runs/central/best.pt --he slides/he.svs "
                        "--ck56 slides/ck56.svs --out pred-wsi"),
    Step("extract-rois", "egcmf extract-rois --he slides/he.svs --ck56 slides/ck56.svs "
                         "--annotations slides/annotations.geojson --out sites/plagh"),
    Step("check-rois", "egcmf check-site sites/plagh"),
    Step("sim-rois", "python sim/run.py --dataset sites --data sites/plagh --partition iid "
                     "--clients 2 --rounds 2"),
]


def check_readme() -> None:
    text = README.read_text()
    missing = [s.command for s in STEPS if s.command not in text]
    if missing:
        sys.exit("README.md no longer shows:\n  " + "\n  ".join(missing))


def site_stand_in(work: Path) -> None:
    """``data/plagh``: one hospital's site folder, 48 synthetic ROIs."""
    from egcmf_model.data.synthetic import write_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        site = write_synthetic(Path(tmp), sites=1, rois_per_site=48, size=256, seed=11)[0]
        meta = yaml.safe_load((site / "site.yaml").read_text())
        meta["name"] = "plagh"
        (site / "site.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
        shutil.move(site, work / "data" / "plagh")


# synthetic class -> BCSS code: background as stroma (2), in situ as DCIS (20), invasive as
# tumor (1); unlabelled (255) as outside_roi (0).
BCSS_CODES = {0: 2, 1: 20, 2: 1, 255: 0}
INSTITUTIONS = ("A1", "A2", "AR", "BH", "C8", "OL", "E2")  # the last two: BCSS's test set


def bcss_stand_in(work: Path) -> None:
    """``BCSS/``: seven hospitals' synthetic H&E ROIs under TCGA names, masks in BCSS codes."""
    from egcmf_model.data.io import read_mask, write_png
    from egcmf_model.data.synthetic import write_synthetic

    root = work / "BCSS"
    with tempfile.TemporaryDirectory() as tmp:
        sites = write_synthetic(Path(tmp), sites=len(INSTITUTIONS), rois_per_site=6, size=256,
                                seed=12)
        for tss, site in zip(INSTITUTIONS, sites, strict=True):
            for i, roi in enumerate(sorted((site / "rois").iterdir())):
                stem = f"TCGA-{tss}-A{i:03d}-DX1_xmin{i}_ymin{i}_MPP-0.2500"
                shutil.copy(roi / "he.png", _made(root / "images" / f"{stem}.png"))
                mask = read_mask(roi / "mask.png")
                codes = np.zeros_like(mask)
                for ours, code in BCSS_CODES.items():
                    codes[mask == ours] = code
                write_png(root / "masks" / f"{stem}.png", codes)


def _made(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def before(step: Step, work: Path) -> None:
    if step.name == "predict":  # the README's he.png and ck56.png: a test ROI of site_01
        meta = yaml.safe_load((work / "data/synthetic/site_01/site.yaml").read_text())
        roi = work / "data/synthetic/site_01/rois" / meta["splits"]["test"][0]
        for key in ("he", "ck56"):
            shutil.copy(roi / f"{key}.png", work / f"{key}.png")
    elif step.name == "your-sites":
        site_stand_in(work)
    elif step.name == "bcss-summary":
        bcss_stand_in(work)


def run(step: Step, work: Path, env: dict[str, str], limit: float) -> dict:
    runs = set((work / "runs").glob("*"))
    log = work / "logs" / f"{step.name}.log"
    log.parent.mkdir(exist_ok=True)
    began = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(shlex.split(step.command + step.extra), cwd=work, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        while step.stop_when and proc.poll() is None:
            if (work / step.stop_when).exists():
                os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the terminal's process group
                break
            time.sleep(0.2)
        try:
            proc.wait(timeout=max(1.0, limit - (time.monotonic() - began)))
        except subprocess.TimeoutExpired:  # a command that hangs is a failure, not a stall
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    seconds = time.monotonic() - began
    new = sorted(set((work / "runs").glob("*")) - runs)
    return {"step": step.name, "rc": proc.returncode, "seconds": round(seconds, 1),
            "report": report(step, work, log, new)}


def report(step: Step, work: Path, log: Path, new: list[Path]) -> str:
    text = log.read_text()
    lines = [x for x in text.splitlines() if x.strip()]
    summaries = [p / "summary.json" for p in new if (p / "summary.json").exists()]
    if summaries:
        doc = json.loads(summaries[0].read_text())
        best = doc.get("best") or {}
        return (f"{new[0].relative_to(work)}: final Dice {doc['final']['dice']:.3f}, best "
                f"{best.get('dice', float('nan')):.3f} (round {best.get('round')}), initial "
                f"{doc.get('initial', {}).get('dice', float('nan')):.3f}")
    if step.name == "evaluate-json":
        return f"Dice {json.loads(lines[-1])['dice']:.3f}"
    if step.name == "evaluate":
        return next((x for x in lines if "Dice(%)" in x), "")
    return lines[-1][:160] if lines else ""


def expected(step: Step, result: dict, gpu: bool) -> bool:
    if step.stop_when:
        return result["rc"] == 130
    if step.name == "gpu" and not gpu:
        return result["rc"] == 2 and "this machine has" in result["report"]
    return result["rc"] == 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, help="an empty folder (default: a new temporary one)")
    p.add_argument("--only", nargs="+", metavar="STEP", choices=[s.name for s in STEPS],
                   help="these steps alone (a later step needs what the earlier ones wrote)")
    p.add_argument("--limit", type=float, default=1800.0,
                   help="seconds a command may take before it counts as hung and is ended "
                        "(default %(default)s)")
    args = p.parse_args()
    check_readme()
    work = args.work or Path(tempfile.mkdtemp(prefix="egcmf-readme-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "sim").exists():
        (work / "sim").symlink_to(ROOT / "sim")  # `python sim/run.py` as from the repository
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "EGCMF_CACHE": str(work / "cache")}
    gpu = _has_gpu()
    print(json.dumps({"work": str(work), "gpu": gpu,
                      "load": Path("/proc/loadavg").read_text().split()[:3]}), flush=True)
    results, failed = [], []
    for step in STEPS:
        if args.only and step.name not in args.only:
            continue
        before(step, work)
        result = run(step, work, env, args.limit)
        results.append(result)
        if not expected(step, result, gpu):
            failed.append(step.name)
        print(json.dumps(result), flush=True)
    print("\n| command | exit | seconds | what it reports |\n|---|---|---|---|")
    by_name = {s.name: s for s in STEPS}
    for r in results:
        step = by_name[r["step"]]
        print(f"| `{step.command}{step.extra}` | {r['rc']} | {r['seconds']} | {r['report']} |")
    if failed:
        print(f"\nnot as expected: {', '.join(failed)} (logs in {work / 'logs'})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
