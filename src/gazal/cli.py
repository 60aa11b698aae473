"""The `gazal` command. The only module that prints; everything else logs."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import time
from pathlib import Path

from gazal.errors import GazalError

STAGE_HELP = {
    "run": "run every enabled stage of a recipe (SFT -> GRPO -> eval -> report); resumes an unfinished --run-dir",
    "sft": "stage 1: supervised fine-tuning with DoRA + rsLoRA",
    "grpo": "stage 2: GRPO with the recipe's multi-component reward",
    "eval": "evaluate the run's newest model on MedQA, MMLU-Pro medical and PubMedQA",
    "report": "write report.md and report.html (plots, samples) from a run directory",
    "validate": "check a recipe (types, unknown keys, files) without running it",
}
SCORE_HELP = "score generations from anywhere with Gazal's answer extractor and metrics"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gazal", description="Train and evaluate medical reasoning models the Gazal-R1 way.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in STAGE_HELP.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", "-c", default=None if name == "report" else "demo", metavar="RECIPE",
                       help="a recipe YAML path or a shipped recipe name such as 'demo' (default: demo)")
        if name != "validate":
            p.add_argument("--run-dir", type=Path, default=None,
                           help="run directory to use (default: a new one; for report: the recipe's newest)")
        else:
            p.add_argument("--explain", action="store_true", help="list every recipe key with its documentation")
            p.add_argument("--accelerate-config", type=Path, default=None, metavar="FILE",
                           help="also check the accelerate config the recipe will be launched with")
        if name in ("run", "sft", "grpo"):
            p.add_argument("--resume", action="store_true",
                           help="continue an unfinished training stage from its newest checkpoint in --run-dir")
        else:
            p.set_defaults(resume=False)
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. sft.learning_rate=1e-4")
    help_text = "re-run a run from its manifest.json: the same recipe and seeds, after saying what differs now"
    p = sub.add_parser("reproduce", help=help_text, description=help_text + " (packages, hardware, data, model and "
                       "benchmark hashes); then `gazal compare OLD NEW` shows whether the results agree")
    p.add_argument("origin", type=Path, metavar="RUN_DIR", help="a finished run directory with manifest.json")
    p.add_argument("--run-dir", type=Path, default=None, help="where the new run goes (default: a new directory)")
    p.set_defaults(resume=False, overrides=[], config=None)
    p = sub.add_parser("score", help=SCORE_HELP, description=SCORE_HELP + ". Each line: id, completion, answer, and "
                       "options (letter -> text) or labels (e.g. [\"yes\", \"no\", \"maybe\"]).")
    p.add_argument("predictions", type=Path, metavar="PREDICTIONS.jsonl")
    p.add_argument("--out", type=Path, default=None, help="scored lines (default: PREDICTIONS.scored.jsonl)")
    p = sub.add_parser("rewards", help="score completions with a recipe's reward, or audit it against reward hacking")
    rsub = p.add_subparsers(dest="rewards_command", required=True, metavar="ACTION")
    r = rsub.add_parser("score", help="score completions (completion, answer, options or labels[, prompt]) per component")
    r.add_argument("completions", type=Path, metavar="FILE.jsonl")
    r.add_argument("--out", type=Path, default=None, help="write each line with `rewards` and `total`")
    r.add_argument("--config", "-c", default="demo", metavar="RECIPE")
    r.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    r = rsub.add_parser("audit", help="gaming completions vs honest ones; exit 1 if any hack scores >= honest",
                        description="Score gaming completions against honest ones with the recipe's rewards; exit 1 "
                        "if any hack scores >= honest. With --judge, grade them with the recipe's judge reward on a "
                        "served grader instead and report per hack family how often the hack is graded below the "
                        "honest completion, with the grading cost: a measurement, exit 0 unless an error (exit 2).")
    r.add_argument("--config", "-c", default="demo", metavar="RECIPE")
    r.add_argument("--questions", type=_positive, default=8, metavar="N",
                   help="seed cases to audit, spread over the file (default 8, as before GRPO; 163 is all)")
    r.add_argument("--judge", action="store_true",
                   help="audit the judge reward against a served grader (the recipe's judge params, or the options below)")
    r.add_argument("--judge-url", default=None, metavar="URL", help="with --judge: the grader's OpenAI-compatible "
                   "base URL, e.g. http://127.0.0.1:8001/v1 (overrides the recipe's)")
    r.add_argument("--judge-model", default=None, metavar="NAME", help="with --judge: the model name to ask for")
    r.add_argument("--rubric", default=None, metavar="FILE", help="with --judge: a rubric template "
                   "($question, $reasoning, $answer; default: the recipe's, else the bundled one)")
    r.add_argument("--judge-max-tokens", type=_positive, default=None, metavar="N",
                   help="with --judge: the grader's max_tokens per reply")
    r.add_argument("--json", type=Path, default=None, metavar="FILE", help="with --judge: also write every row as JSON")
    r.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible API (/v1/chat/completions, /v1/models)")
    p.add_argument("--model", required=True, metavar="PATH_OR_NAME",
                   help="a local model folder (e.g. RUN/grpo/merged), a hub id, or a Gazal model name")
    p.add_argument("--adapter", default=None, metavar="DIR", help="a PEFT adapter to merge into --model first")
    p.add_argument("--name", default="gazal", help="the model name clients ask for (default: gazal)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port; the chosen one is printed)")
    p.add_argument("--max-tokens", type=_positive, default=2048, metavar="N",
                   help="refuse (400) max_tokens above N, or above the context left by the prompt (default: 2048)")
    p.add_argument("--max-n", type=_positive, default=8, metavar="N", help="refuse (400) n above N (default: 8)")
    p.add_argument("--max-queue", type=int, default=8, metavar="N",
                   help="requests that may wait while one generates; more get 429 with Retry-After (default: 8)")
    p = sub.add_parser("data", help="synthesize or curate training data")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    d = dsub.add_parser("synth", help="generate SFT examples through an OpenAI-compatible endpoint (resumable)")
    d.add_argument("--config", "-c", default="demo", metavar="RECIPE")
    d.add_argument("--out", type=Path, default=None, help="output folder (default: the recipe's synth.output_dir)")
    d.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    d = dsub.add_parser("curate", help="validate, filter, deduplicate and decontaminate a JSONL file")
    d.add_argument("input", type=Path, metavar="IN.jsonl")
    d.add_argument("--out", type=Path, required=True, metavar="OUT.jsonl")
    d.add_argument("--benchmarks", type=Path, default=None, metavar="DIR",
                   help="benchmark JSONL folder to decontaminate against (default: $GAZAL_BENCHMARKS_DIR if set)")
    d.add_argument("--config", "-c", default="demo", metavar="RECIPE", help="recipe whose curate section to use")
    d.add_argument("--drop-list", type=Path, default=None, metavar="REVIEW.json",
                   help="a data-file review's review.json (gazal review import): drop the rows judged incorrect or unsafe")
    d.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p = sub.add_parser("review", help="physician review: export cases for a clinician, import the verdicts")
    rsub = p.add_subparsers(dest="review_command", required=True, metavar="ACTION")
    d = rsub.add_parser("export", help="write a review package (review.csv, review.html form, manifest.json)")
    d.add_argument("origin", type=Path, metavar="RUN_DIR|DATA.jsonl",
                   help="a run directory (its evaluation or GRPO samples) or an SFT data file")
    d.add_argument("--source", choices=("eval", "grpo"), default="eval",
                   help="for a run directory: evaluation items or GRPO rollouts (default: eval)")
    d.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder of the review package")
    d.add_argument("-n", type=int, default=40, help="cases to sample (default 40)")
    d.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    d = rsub.add_parser("import", help="validate returned verdicts (CSV or the form's JSON); write review.json")
    d.add_argument("package", type=Path, metavar="DIR", help="the review package the cases were exported to")
    d.add_argument("verdicts", type=Path, metavar="VERDICTS.csv|.json")
    d.add_argument("--out", type=Path, default=None, help="where to write review.json (default: DIR/review.json)")
    help_text = "is run B better than run A on each benchmark, or is the difference noise? (paired by item)"
    p = sub.add_parser("compare", help=help_text, description=help_text)
    p.add_argument("run_a", type=Path, metavar="RUN_A")
    p.add_argument("run_b", type=Path, metavar="RUN_B")
    p.add_argument("--mode", choices=("reasoning", "direct"), default="reasoning",
                   help="which evaluation's samples to compare (default: reasoning)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed, used with several samples per item (default 0)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the full comparison as JSON")
    help_text = ("estimate each stage's memory per GPU (or host memory on CPU), every GPU the recipe uses (the vLLM "
                 "server's included), SFT's optimizer steps and throughput before launching; exit 2 naming the key "
                 "to change when the recipe cannot fit")
    p = sub.add_parser("plan", help=help_text, description=help_text)
    p.add_argument("--config", "-c", default="demo", metavar="RECIPE")
    p.add_argument("--gpus", type=int, default=1, metavar="N", help="GPUs per node (0: plan a CPU run; default 1)")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GIB", help="memory of one GPU in GiB (e.g. 80)")
    p.add_argument("--nodes", type=int, default=1, metavar="K", help="nodes of --gpus GPUs each (default 1)")
    p.add_argument("--sharding", choices=("zero3", "fsdp", "ddp"), default=None,
                   help="how training shards (default: zero3 on several GPUs, as the shipped DeepSpeed config; ddp on one)")
    p.add_argument("--gpu-flops", type=float, default=None, metavar="TFLOPS",
                   help="peak dense TFLOP/s of one GPU in the training dtype (default: H100 bf16, 989)")
    p.add_argument("--cpu", action="store_true", help="plan a CPU run: peak host memory of each stage's process")
    p.add_argument("--memory", type=float, default=None, metavar="GIB",
                   help="with --cpu: host memory budget in GiB (default: this machine's)")
    p.add_argument("--strict", action="store_true",
                   help="also exit 2 (as when a stage does not fit) on the plan's warnings: a vLLM server whose GPUs "
                        "the recipe does not declare (grpo.vllm_server_tensor_parallel_size), sft.save_steps or "
                        "sft.eval_steps beyond SFT's estimated steps")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. sft.max_length=4096")
    return parser


def _plan(args: argparse.Namespace) -> int:
    from gazal import plan, plan_report, recipes

    recipe = recipes.load_recipe(args.config, args.overrides)
    result = plan.plan(recipe, gpus=args.gpus, gpu_memory_gib=args.gpu_memory, nodes=args.nodes,
                       sharding=args.sharding, gpu_tflops=args.gpu_flops, cpu=args.cpu, memory_gib=args.memory)
    print(plan_report.format_plan(result, args.config), flush=True)
    # GazalError (exit 2) naming the key when it cannot fit; with --strict, on its warnings too.
    plan_report.check(result, args.config, strict=args.strict)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from gazal.serve import ChatModel, Limits, make_server

    limits = Limits(args.max_tokens, args.max_n, args.max_queue)  # checked before the model loads
    model = ChatModel(args.model, args.adapter)
    server = make_server(model, args.name, args.host, args.port, limits)
    host, port = server.server_address[:2]
    print(f"serving '{args.name}' on http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _review(args) -> int:
    from gazal import review

    if args.review_command == "export":
        if args.origin.is_dir():
            if not (args.origin / "recipe.yaml").is_file():
                raise GazalError(f"{args.origin}: not a Gazal run directory (no recipe.yaml)")
            rows = review.rows_from_run(args.origin, args.source)
            origin = f"{args.source} samples of {args.origin}"
        else:
            rows = review.rows_from_data(args.origin)
            origin = f"data file {args.origin}"
        done = review.export(rows, args.out, args.n, args.seed, origin)
        print(f"review export: {done['rows']} of {done['of']} cases -> {args.out}/review.csv, review.html "
              "(send either to the reviewer), manifest.json (keep)")
        return 0
    result = review.import_verdicts(args.package, args.verdicts, args.out)
    v = result["verdicts"]
    print(f"review import: {result['cases']} cases: {v['correct']} correct, {v['incorrect']} incorrect, "
          f"{v['unsafe']} unsafe")
    if result["agreement_rate"] is not None:
        print(f"  reviewer agrees with the automatic grading on {result['reviewer_agrees_with_grading']} of "
              f"{result['graded_cases']} ({100 * result['agreement_rate']:.1f}%)")
    if result["drop"] is not None:
        print(f"  {len(result['drop'])} data rows to drop: gazal data curate IN.jsonl --out OUT.jsonl "
              f"--drop-list {args.out or args.package / 'review.json'}")
    return 0


def _data(args: argparse.Namespace) -> int:
    from gazal import recipes

    recipe = recipes.load_recipe(args.config, args.overrides)
    if args.data_command == "synth":
        from gazal import synth

        m = synth.main(recipe, args.out)
        print(f"synth: {m['items']} of {m['requested']} items, {m['failed']} failed; this run "
              f"{m['tokens_this_run']['prompt']} prompt + {m['tokens_this_run']['completion']} completion tokens, "
              f"cost {m['cost_this_run']}")
        return 0 if m["items"] + m["failed"] == m["requested"] else 1
    from gazal import curate
    from gazal.benchmarks import benchmarks_dir

    if not args.input.is_file():
        raise GazalError(f"{args.input}: file not found")
    bdir = args.benchmarks or benchmarks_dir(None)
    drops = None
    if args.drop_list is not None:
        from gazal import review

        drops = review.read_drop_list(args.drop_list)
    report = curate.main(args.input, args.out, recipe.curate, bdir, drops)
    print(f"curate: {report['input']} rows in, {report['kept']} kept -> {args.out}")
    for reason, n in report["dropped"].items():
        if n:
            print(f"  dropped {n} {reason}")
    if bdir is None:
        print("  (no --benchmarks: decontamination not checked)")
    print(f"report: {args.out.with_suffix('.report.md')}")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _compare(args: argparse.Namespace) -> int:
    from gazal import rundir
    from gazal.compare import compare_runs

    res = compare_runs(args.run_a, args.run_b, mode=args.mode, seed=args.seed)
    print(f"A: {res['run_a']}\nB: {res['run_b']}\nmode {res['mode']}; 95% intervals; verdicts at alpha {res['alpha']}")
    for name, b in res["benchmarks"].items():
        if "skipped" in b:
            print(f"{name}: skipped: {b['skipped']}")
            continue
        lo, hi = b["ci95"]
        print(f"{name}: n={b['n']}, A {100 * b['accuracy_a']:.1f}%, B {100 * b['accuracy_b']:.1f}%, "
              f"B-A {100 * b['difference']:+.1f} pts (95% CI {100 * lo:+.1f} to {100 * hi:+.1f}), "
              f"{b['test']} p={b['p_value']:.3g}: {b['verdict']}")
        same = b.get("same_predictions")
        if same is not None:
            sha = res["benchmark_sha256"].get(name)
            data = f", benchmark sha256 {sha[:12]} in both" if sha else ""
            print(f"  same answer in both runs: {same['same']}/{same['of']}{data}")
        for cat, c in b["per_category"].items():
            print(f"  {cat}: n={c['n']}, A {100 * c['accuracy_a']:.1f}%, B {100 * c['accuracy_b']:.1f}%, "
                  f"B-A {100 * c['difference']:+.1f} pts")
    if args.json:
        rundir.write_json(args.json, res)
        print(f"wrote {args.json}")
    return 0


def _rewards(args: argparse.Namespace) -> int:
    import json

    from gazal import audit, recipes

    recipe = recipes.load_recipe(args.config, args.overrides)
    if args.rewards_command == "audit" and args.judge:
        from gazal import judge_audit, rundir

        params = judge_audit.judge_params(recipe, args.judge_url, args.judge_model, args.rubric, args.judge_max_tokens)
        rows, cost = judge_audit.run_judge_audit(recipe, params, args.questions)
        print("\n".join(judge_audit.format_report(rows, cost)))
        if args.json:
            rundir.write_json(args.json, judge_audit.report_json(rows, cost))
            print(f"wrote {args.json}")
        return 0  # a measurement, not a gate
    if args.rewards_command == "audit" and (args.judge_url or args.judge_model or args.rubric or args.json
                                            or args.judge_max_tokens):
        raise GazalError("--judge-url, --judge-model, --rubric, --judge-max-tokens and --json apply only with --judge")
    tokenizer = audit.reward_tokenizer(recipe)
    if args.rewards_command == "audit":
        rows = audit.run_audit(recipe, tokenizer, args.questions)
        # One line per hack family: its closest call over every question and honest completion.
        print("single completions (what a group with mixed accuracy compares): hack total vs each honest cut")
        print(f"{'hack':<36} {'pairs':>5} {'failed':>6} {'margin':>8}  closest (question, honest cut)")
        for hack in dict.fromkeys(r.hack for r in rows):
            mine = [r for r in rows if r.hack == hack]
            worst = min(mine, key=lambda r: r.honest_total - r.hack_total)
            bad = sum(not r.passed for r in mine)
            verdict = ("" if not bad else "  KNOWN OPEN (audit.KNOWN_OPEN)" if worst.known_open
                       else "  semantic: ties by design, see below" if not worst.gated else "  GAMES THE REWARD")
            print(f"{hack:<36} {len(mine):>5} {bad:>6} {worst.honest_total - worst.hack_total:>8.3f}  "
                  f"{worst.question} {worst.honest} ({worst.hack_total:.3f} vs {worst.honest_total:.3f}){verdict}")
        failed = sum(not r.passed and r.gated for r in rows)
        open_ = sum(not r.passed and not r.gated for r in rows)
        print(f"{len(rows) - failed - open_} of {len(rows)} hack/honest pairs passed, {failed} failed"
              + (f", {open_} of known open or semantic families" if open_ else ""))
        verdicts = audit.advantage_verdicts(audit.advantage_audit(recipe, tokenizer, args.questions))
        g = recipe.grpo
        print(f"\nall-correct groups of {g.num_generations} ({g.multi_objective_aggregation}, scale_rewards "
              f"{g.scale_rewards}): cases where the hack's advantage beats the full honest reasoning's")
        print(f"{'hack':<36} {'set':<11} {'kind':<10} {'cases':>5} {'correct':>7} {'wins':>5} {'allowed':>7} "
              f"{'max gap':>8}")
        bad_families = []
        for family, v in verdicts.items():
            verdict = "" if v["passed"] else "  KNOWN OPEN (audit.KNOWN_OPEN)" if family in audit.KNOWN_OPEN \
                else "  OVER THE BAR"
            if not v["passed"] and family not in audit.KNOWN_OPEN:
                bad_families.append(family)
            print(f"{family:<36} {v['set']:<11} {v['kind']:<10} {v['cases']:>5} {v['correct']:>7} {v['wins']:>5} "
                  f"{v['allowed']:>7} {v['max_gap']:>+8.3f}{verdict}")
        within = sum(v["passed"] for v in verdicts.values())
        print(f"{within} of {len(verdicts)} families within the bar (structural 0 wins, semantic at most "
              f"{audit.SEMANTIC_BAR:.0%} of cases), {len(verdicts) - within - len(bad_families)} known open")
        return 1 if failed or bad_families else 0
    rows = audit.score_file(recipe, args.completions, tokenizer)
    names = list(rows[0]["rewards"]) if rows else []
    print(f"{'component':<20} {'mean':>8} {'min':>8} {'max':>8} {'skipped':>8}")
    for name in names + ["total"]:
        vals = [r["rewards"][name] if name != "total" else r["total"] for r in rows]
        got = [v for v in vals if v is not None]
        if got:
            print(f"{name:<20} {sum(got) / len(got):>8.3f} {min(got):>8.3f} {max(got):>8.3f} {len(vals) - len(got):>8}")
    if args.out:
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(args.out)
        print(f"wrote {len(rows)} lines to {args.out}")
    return 0


def _run_stage(name: str, recipe, run_dir: Path, resume: bool = False) -> None:
    from gazal import rundir

    # Imported here: `gazal validate` and `gazal --help` stay fast without loading torch/TRL.
    if name == "sft":
        from gazal import sft as stage
    elif name == "grpo":
        from gazal import grpo as stage
    else:
        from gazal import evaluate as stage
    start = time.time()
    rundir.reset_peak_memory()  # each stage reports its own peak
    print(f"==> {name}", flush=True)
    if name == "eval":
        stage.main(recipe, run_dir)
    else:
        stage.main(recipe, run_dir, resume=resume)
    # What the stage held must be gone before the next stage loads its own model (on a GPU, vLLM
    # replicas for evaluation need the memory the training stage's allocator still caches).
    gc.collect()
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        sys.modules["torch"].cuda.empty_cache()
    print(f"<== {name} finished in {time.time() - start:.0f}s", flush=True)


def _reproduce_preflight(args: argparse.Namespace) -> None:
    """Say what differs from what the run recorded, put back the environment that chose its data,
    and point the command at the recorded recipe (resolved, seeds included)."""
    from gazal import manifest

    recorded = manifest.read(args.origin)
    if not recorded or not (args.origin / "recipe.yaml").is_file():
        raise GazalError(f"{args.origin}: no manifest.json and recipe.yaml to reproduce from (runs before "
                         "manifests: use `gazal run --config RUN/recipe.yaml`)")
    diffs = manifest.differences(args.origin)
    print(f"reproducing {args.origin}: " + ("packages, hardware class, data, models and benchmarks as recorded"
                                           if not diffs else f"{len(diffs)} difference(s) from what it recorded:"))
    for line in diffs:
        print(f"  {line}")
    folder = recorded.get("environment", {}).get("GAZAL_BENCHMARKS_DIR")
    if folder and "GAZAL_BENCHMARKS_DIR" not in os.environ and Path(folder).is_dir():
        os.environ["GAZAL_BENCHMARKS_DIR"] = folder  # the benchmark files the run evaluated
    args.config = str(args.origin / "recipe.yaml")


def _dispatch(args: argparse.Namespace) -> int:
    from gazal import config, recipes, rundir

    if args.command == "rewards":
        return _rewards(args)
    if args.command == "compare":
        return _compare(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "data":
        return _data(args)
    if args.command == "review":
        return _review(args)
    if args.command == "plan":
        return _plan(args)

    if args.command == "score":
        from gazal.scoring import score_file

        out, m = score_file(args.predictions, args.out)
        print(f"scored {m['n']} items -> {out}")
        lo, hi = m["ci95"]
        print(f"accuracy {100 * m['accuracy']:.1f}% (95% CI {100 * lo:.1f}-{100 * hi:.1f})")
        print("extractor status: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in m["status_rates"].items()))
        for cat, v in m["per_category"].items():
            print(f"  {cat}: {100 * v['accuracy']:.1f}% (n={v['n']})")
        return 0

    if args.command == "report":
        from gazal import report

        run_dir = args.run_dir
        if run_dir is None:
            run_dir = rundir.latest_run_dir(recipes.load_recipe(args.config or "demo", args.overrides))
        path = report.main(run_dir)
        print(path.read_text(encoding="utf-8"))
        print(f"\nreport: {path} and {path.with_suffix('.html')}")
        return 0

    if args.command == "reproduce":
        _reproduce_preflight(args)  # then it is `gazal run` of the recorded recipe
    recipe = recipes.load_recipe(args.config, args.overrides)
    if args.command == "validate":
        if args.explain:
            print("\n".join(config.explain()))
        if args.accelerate_config is not None:
            recipes.check_accelerate_config(args.accelerate_config)
            print(f"{args.accelerate_config}: accelerate config accepted")
        from gazal import datacheck

        for checked in datacheck.check_data(recipe):
            print(checked.line())
        print(f"{args.config}: valid recipe '{recipe.name}'")
        return 0

    resume = args.resume
    if resume and args.run_dir is None:
        raise GazalError("--resume needs --run-dir: the run directory whose checkpoints to continue from")
    if rundir.distributed() and args.run_dir is None:
        # Each process would stamp its own new directory; they must agree on one.
        raise GazalError("under accelerate launch / torchrun, pass --run-dir so every process uses the same run directory")
    run_dir = args.run_dir or rundir.new_run_dir(recipe)
    rundir.lock(run_dir)  # one writer per run directory: refused (exit 2) before anything is written
    rundir.prepare(run_dir, recipe)
    print(f"run directory: {run_dir}", flush=True)
    if args.command in ("run", "reproduce"):
        for name in rundir.STAGES:
            if not getattr(recipe, name).enabled:
                print(f"--- {name}: disabled in the recipe")
            elif rundir.is_done(run_dir, name):
                print(f"--- {name}: already finished in {run_dir}, skipping")
            else:
                _run_stage(name, recipe, run_dir, resume and (run_dir / name / "checkpoints").is_dir())
        if not rundir.is_main_process():
            return 0
        from gazal import report

        path = report.main(run_dir)
        print(path.read_text(encoding="utf-8"))
        print(f"\nreport: {path} and {path.with_suffix('.html')}")
        if args.command == "reproduce":
            print(f"do the results agree? gazal compare {args.origin} {run_dir}")
    else:
        _run_stage(args.command, recipe, run_dir, resume)
        if args.command == "eval" and rundir.is_main_process():
            from gazal import report

            res = rundir.read_json(run_dir / "eval" / "results.json")
            print("\n".join(report.eval_table(res) + ["", *report.recall_table(res)]))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `gazal` command."""
    parser = _parser()
    # Overrides may sit anywhere on the line (argparse stops collecting a positional list at the
    # first option when a command has two positionals), so stray key=value words join them.
    args, extra = parser.parse_known_args(argv)
    stray = [w for w in extra if w.startswith("-") or "=" not in w]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=os.environ.get("GAZAL_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return _dispatch(args)
    except GazalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
