"""How far to trust `gazal plan --cpu`: its estimate of each stage's peak host memory against the
peak a real run measures (VmHWM from summary.json / results.json, each stage run as its own
`gazal` command, one process, CPU, as a user runs it).

The runs are short (a few steps) but hit the worst case the estimate assumes: SFT packs rows to
sft.max_length, GRPO draws from the 8 longest seed questions, evaluation generates to
eval.max_new_tokens.

    python bench/plan_accuracy.py                      # the tiny Qwen3 and SmolLM2 (demo), ~6 minutes on 2 cores
    python bench/plan_accuracy.py --models tiny
    python bench/plan_accuracy.py --baseline           # re-measure plan.CPU_BASELINE_MIB (tiny model)

Needs the shared benchmark copies (../shared/benchmarks, or --benchmarks DIR) for the eval stage.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("sft", "grpo", "eval")
MODELS = {
    "tiny": ["model.name_or_path=gazal:tiny-qwen3", "data.sft_limit=12", "sft.max_length=1024"],
    "smollm2": ["model.name_or_path=gazal:smollm2-135m-instruct", "sft.max_length=1024"],
}
COMMON = ["sft.max_steps=3", "sft.packing=true", "sft.save_steps=0",
          "grpo.max_steps=2", "grpo.max_completion_length=64", "grpo.save_steps=0", "grpo.samples_every=0",
          "grpo.skip_reward_audit=true", "grpo.rewards=[{name: accuracy}, {name: format, weight: 0.5}]",
          "eval.benchmarks=[medqa]", "eval.limit=10", "eval.max_new_tokens=64", "eval.modes=[reasoning]"]


def longest_questions(path: Path, n: int = 8) -> Path:
    """The n seed GRPO questions with the longest prompts, so every rollout is near the longest."""
    from gazal.data import seed_path

    rows = [json.loads(line) for line in seed_path("seed:grpo").read_text(encoding="utf-8").splitlines() if line.strip()]
    rows.sort(key=lambda r: -(len(r["question"]) + sum(len(v) for v in r["options"].values())))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]), encoding="utf-8")
    return path


def overrides(model: str, work: Path, benchmarks: Path) -> list[str]:
    return [*MODELS[model], *COMMON, f"data.grpo={longest_questions(work / 'longest.jsonl')}",
            f"eval.benchmarks_dir={benchmarks}"]


def estimate(over: list[str]) -> dict[str, tuple[float, str, float]]:
    """Per stage: the estimated peak (MiB), the phase it is in, and the process baseline in it."""
    from gazal import plan, recipes

    p = plan.plan(recipes.load_recipe("demo", over), cpu=True)
    out: dict[str, tuple[float, str, float]] = {}
    for ph in p.phases:
        if ph.stage not in out or ph.total / plan.MIB > out[ph.stage][0]:
            out[ph.stage] = (ph.total / plan.MIB, ph.name, ph.rows["process baseline"] / plan.MIB)
    return out


def measure(over: list[str], run_dir: Path) -> dict[str, float]:
    """Run each stage as its own `gazal` command; its peak RSS (MiB) from the stage's record."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "CUDA_VISIBLE_DEVICES": "",
           "HF_HUB_OFFLINE": "1", "GAZAL_LOG_LEVEL": "WARNING",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    out = {}
    for stage in STAGES:
        cmd = [sys.executable, "-m", "gazal", stage, "--config", "demo", "--run-dir", str(run_dir), *over]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{' '.join(cmd)}\n{proc.stderr[-3000:]}")
        record = run_dir / stage / ("results.json" if stage == "eval" else "summary.json")
        out[stage] = json.loads(record.read_text())["peak_rss_mb"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["tiny", "smollm2"])
    parser.add_argument("--benchmarks", type=Path, default=ROOT.parent / "shared" / "benchmarks")
    parser.add_argument("--baseline", action="store_true",
                        help="print each stage's measured peak minus the estimate's model-dependent parts (tiny model)")
    args = parser.parse_args()
    if not (args.benchmarks / "medqa_test.jsonl").is_file():
        sys.exit(f"{args.benchmarks}/medqa_test.jsonl not found (pass --benchmarks DIR)")
    models = ["tiny"] if args.baseline else args.models
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            work = Path(tmp) / model
            work.mkdir()
            over = overrides(model, work, args.benchmarks)
            est = estimate(over)
            got = measure(over, work / "run")
            for stage in STAGES:
                e, phase, base = est[stage]
                rows.append((model, stage, e, got[stage], phase, base))
    if args.baseline:
        print("process baseline per stage (MiB): measured peak - (estimate - its baseline), tiny model")
        for model, stage, e, m, phase, base in rows:
            print(f"  {stage}: {m - (e - base):.0f} (plan.CPU_BASELINE_MIB has {base:.0f})")
        return
    print("gazal plan --cpu against measured peak RSS, each stage its own process (MiB)")
    print(f"{'model':<8} {'stage':<5} {'estimate':>9} {'measured':>9} {'error':>7}  phase of the estimated peak")
    worst = 0.0
    for model, stage, e, m, phase, _ in rows:
        err = (e - m) / m
        worst = max(worst, abs(err))
        print(f"{model:<8} {stage:<5} {e:>9,.0f} {m:>9,.0f} {err:>+7.1%}  {phase}")
    print(f"largest error {worst:.1%}")


if __name__ == "__main__":
    main()
