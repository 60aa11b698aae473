"""report.html: the run's curves, evaluation and samples on one self-contained page.

Plots are drawn by matplotlib into inline SVG (no CDN, no server, no JavaScript library): the page
opens offline from the run directory. Each plotted series carries an SVG id starting with
`data-`, so a browser test can check that every plot drew real data. The only script is the
sample table's filter (a few lines, inline). Like report.md, this reads a run directory and never
trains or generates; files a run does not have (older runs, stages not run) are left out.
"""

from __future__ import annotations

import html
import io
import json
import logging
from pathlib import Path

from gazal import card, rundir
from gazal.benchmarks import TITLES
from gazal.monitor import read_metrics

log = logging.getLogger(__name__)

# GRPO panels: title -> metric keys drawn together (absent keys are skipped; a panel with none is left out).
GRPO_PANELS = {
    "total reward": ["reward"],
    "accuracy vs format": ["rewards/accuracy/mean", "rewards/format/mean"],
    "completion length (tokens)": ["completions/mean_length", "completions/mean_terminated_length"],
    "clipped ratio (completions cut at the limit)": ["completions/clipped_ratio"],
    "entropy": ["entropy"],
    "KL to the reference": ["kl"],
    "grad norm": ["grad_norm"],
    "groups with zero reward spread": ["frac_reward_zero_std", "gazal/accuracy_zero_std_frac"],
    "loss": ["loss"],
}
SFT_PANELS = {"loss": ["loss", "eval_loss"], "learning rate": ["learning_rate"], "grad norm": ["grad_norm"],
              "mean token accuracy": ["mean_token_accuracy"]}
EVENT_COLOURS = {"warn": "#d08000", "stop": "#c00000", "rollback": "#7030a0"}
SAMPLE_TEXT = 4000  # characters of a prompt or completion shown in the table


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and doctype: the SVG is inline


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "gazal"  # stable ids: the same run gives the same page
    return plt.subplots(figsize=(5.2, 2.8))


def _curve(rows: list[dict], keys: list[str], title: str, events: list[dict], slug: str) -> str | None:
    series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and "step" in r] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig, ax = _figure()
    for i, (key, points) in enumerate(series.items()):
        (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=key)
        line.set_gid(f"data-{slug}-{i}")
    for e in events:
        ax.axvline(e["step"], color=EVENT_COLOURS.get(e["action"], "#808080"), linestyle="--", linewidth=1)
        ax.annotate(f"{e['rule']} ({e['action']})", (e["step"], 1.0), xycoords=("data", "axes fraction"),
                    rotation=90, fontsize=6, va="top", ha="right", color=EVENT_COLOURS.get(e["action"], "#808080"))
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    if len(series) > 1:
        ax.legend(fontsize=7)
    return _plot_block(slug, title, _svg(fig))


def _plot_block(slug: str, title: str, svg: str) -> str:
    return f'<figure class="plot" data-plot="{html.escape(slug)}"><figcaption>{html.escape(title)}</figcaption>{svg}</figure>'


def _bars(groups: list[str], bars: dict[str, list[float | None]], title: str, slug: str,
          errors: dict[str, list[tuple[float, float] | None]] | None = None, marks: list[float | None] | None = None,
          stacked: bool = False, ylabel: str = "%") -> str | None:
    if not groups or not any(v is not None for vals in bars.values() for v in vals):
        return None
    fig, ax = _figure()
    width = 0.8 / (1 if stacked else len(bars))
    bottom = [0.0] * len(groups)
    for i, (name, vals) in enumerate(bars.items()):
        xs = [g + (0 if stacked else (i - (len(bars) - 1) / 2) * width) for g in range(len(groups))]
        heights = [100 * (v or 0.0) for v in vals]
        yerr = None
        if errors and errors.get(name):
            yerr = [[h - 100 * e[0] if e else 0 for h, e in zip(heights, errors[name])],
                    [100 * e[1] - h if e else 0 for h, e in zip(heights, errors[name])]]
        container = ax.bar(xs, heights, width, bottom=bottom if stacked else None, label=name, yerr=yerr, capsize=3)
        for j, patch in enumerate(container.patches):
            patch.set_gid(f"data-{slug}-{i}-{j}")
        if stacked:
            bottom = [b + h for b, h in zip(bottom, heights)]
    if marks and any(m is not None for m in marks):
        ax.scatter([g for g, m in enumerate(marks) if m is not None], [100 * m for m in marks if m is not None],
                   marker="D", color="black", zorder=3, label="Gazal-R1 paper")
    ax.set_xticks(range(len(groups)), groups, fontsize=7)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_ylim(0, 100)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars: it hides no mark
    return _plot_block(slug, title, _svg(fig))


def _stage(run_dir: Path, stage: str, panels: dict[str, list[str]]) -> list[str]:
    folder = run_dir / stage
    rows = read_metrics(folder / "metrics.jsonl")
    title = {"sft": "SFT (DoRA + rsLoRA)", "grpo": "GRPO"}[stage]
    if not rows:
        return [f'<section id="{stage}"><h2>{title}</h2><p>Not run (no metrics.jsonl).</p></section>']
    events = read_metrics(folder / "events.jsonl")
    panels = dict(panels)
    if stage == "grpo":
        components = sorted({k for r in rows for k in r if k.startswith("rewards/") and k.endswith("/mean")})
        panels = {**{f"reward: {k.split('/')[1]}": [k] for k in components}, **panels}
    plots, absent = [], []
    for name, keys in panels.items():
        slug = f"{stage}-" + "".join(c if c.isalnum() else "-" for c in name.lower())
        block = _curve(rows, keys, name, events, slug)
        if block:
            plots.append(block)
        else:
            absent.append(name)
    out = [f'<section id="{stage}"><h2>{title}</h2>']
    if (folder / "summary.json").is_file():
        s = rundir.read_json(folder / "summary.json")
        out.append(f"<p>{s['steps']} steps in {s['seconds']} s from <code>{html.escape(str(s['base_model']))}</code>; "
                   f"peak memory {s.get('peak_rss_mb', 0):.0f} MiB.</p>")
        if s.get("stopped_by_monitor"):
            out.append(f"<p><strong>Stopped by the monitor:</strong> {html.escape(s['stopped_by_monitor']['message'])}</p>")
    if events:
        out.append("<table class='events'><tr><th>step</th><th>rule</th><th>action</th><th>message</th></tr>" + "".join(
            f"<tr><td>{e['step']}</td><td>{html.escape(e['rule'])}</td><td>{html.escape(e['action'])}</td>"
            f"<td>{html.escape(e.get('message', ''))}</td></tr>" for e in events) + "</table>")
    if absent:
        out.append(f"<p class='absent'>not logged in this run: {html.escape(', '.join(absent))}</p>")
    out.append('<div class="plots">' + "".join(plots) + "</div></section>")
    return out


def _evaluation(run_dir: Path) -> list[str]:
    if not rundir.is_done(run_dir, "eval") or not (run_dir / "eval" / "results.json").is_file():
        return ['<section id="eval"><h2>Evaluation</h2><p>Not run (or not finished).</p></section>']
    res = rundir.read_json(run_dir / "eval" / "results.json")
    done = {name: b for name, b in res["benchmarks"].items() if "skipped" not in b}
    titles = [TITLES.get(n, n).split(" (")[0] for n in done]
    plots = []
    bars = {"reasoning": [b["accuracy"] for b in done.values()]}
    errors = {"reasoning": [tuple(b["ci95"]) for b in done.values()]}
    if any("direct" in b for b in done.values()):
        bars["direct"] = [b["direct"]["accuracy"] if "direct" in b else None for b in done.values()]
        errors["direct"] = [tuple(b["direct"]["ci95"]) if "direct" in b else None for b in done.values()]
    plots.append(_bars(titles, bars, "accuracy (95% interval) beside the Gazal-R1 paper", "eval-accuracy", errors,
                       [b.get("paper_accuracy") for b in done.values()]))
    for name, b in done.items():
        cats = b.get("per_category") or {}
        if len(cats) > 1:
            plots.append(_bars(list(cats), {"accuracy": [c["accuracy"] for c in cats.values()]},
                               f"{TITLES.get(name, name)}: accuracy by category", f"eval-category-{name}",
                               {"accuracy": [tuple(c["ci95"]) if "ci95" in c else None for c in cats.values()]}))
    statuses = sorted({s for b in done.values() for s in b["status_rates"]})
    plots.append(_bars(titles, {s: [b["status_rates"].get(s, 0.0) for b in done.values()] for s in statuses},
                       "answer extractor status (reasoning mode)", "eval-status", stacked=True))
    recall = {n: b for n, b in done.items() if "recall_vs_reasoning" in b}
    if recall:
        keys = ["both_right", "reasoning_fixed", "reasoning_broke", "both_wrong"]
        plots.append(_bars([TITLES.get(n, n).split(" (")[0] for n in recall],
                           {k.replace("_", " "): [b["recall_vs_reasoning"][f"{k}_rate"] for b in recall.values()]
                            for k in keys}, "recall (direct) versus reasoning, item by item", "eval-recall",
                           stacked=True))
    table = ["<table class='results'><tr><th>benchmark</th><th>items</th><th>accuracy %</th><th>95% interval</th>"
             "<th>paper %</th><th>direct %</th><th>truncated %</th></tr>"]
    for name, b in res["benchmarks"].items():
        if "skipped" in b:
            table.append(f"<tr><td>{html.escape(TITLES.get(name, name))}</td><td colspan=6>skipped: "
                         f"{html.escape(b['skipped'])}</td></tr>")
            continue
        paper = f"{100 * b['paper_accuracy']:.1f}" if b.get("paper_accuracy") is not None else "-"
        direct = f"{100 * b['direct']['accuracy']:.1f}" if "direct" in b else "-"
        table.append(f"<tr><td>{html.escape(TITLES.get(name, name))}</td><td>{b['n']}</td>"
                     f"<td>{100 * b['accuracy']:.1f}</td><td>{100 * b['ci95'][0]:.1f}-{100 * b['ci95'][1]:.1f}</td>"
                     f"<td>{paper}</td><td>{direct}</td><td>{100 * b['truncation_rate']:.1f}</td></tr>")
    table.append("</table>")
    return ['<section id="eval"><h2>Evaluation</h2>',
            f"<p>Model <code>{html.escape(res['model'])}</code>. The paper's numbers are Qwen3-32B after the full "
            "recipe on the full test sets; a limited run is a smoke test, not a comparison.</p>", *table,
            '<div class="plots">' + "".join(p for p in plots if p) + "</div>", *_comparisons(run_dir), "</section>"]


def _html_table(header: list[str], rows: list[list[str]], css: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table class='{css}'><tr>{head}</tr>{body}</table>"


def _card(run_dir: Path) -> list[str]:
    """The stage report card (eval/results.json: card), first on the page."""
    if not rundir.is_done(run_dir, "eval") or not (run_dir / "eval" / "results.json").is_file():
        return []
    c = rundir.read_json(run_dir / "eval" / "results.json").get("card")
    if not c:
        return []
    out = ['<section id="card"><h2>Stage report card</h2>',
           "<p>Every stage's model on the same items with the same decoding; differences paired item by item, "
           "as <code>gazal compare</code> computes them." +
           (f" Direct answers: {html.escape(c['direct_method'])}." if c.get("direct_method") else "") + "</p>"]
    stages = c["stages"]
    names = list(c["benchmarks"])
    if names:
        bars = {card.STAGE_TITLES.get(s, s): [c["benchmarks"][n]["stages"][s]["accuracy"] for n in names] for s in stages}
        errors = {card.STAGE_TITLES.get(s, s): [tuple(c["benchmarks"][n]["stages"][s]["ci95"]) for n in names]
                  for s in stages}
        out.append('<div class="plots">' + _bars([TITLES.get(n, n).split(" (")[0] for n in names], bars,
                                                 "accuracy by stage (95% interval)", "card-accuracy", errors) + "</div>")
    for name, t in card.tables(c).items():
        out += [f"<h3>{html.escape(TITLES.get(name, name))}</h3>",
                _html_table(card.STAGE_HEADER, t["stages"], "card"),
                _html_table(card.PAIR_HEADER, t["comparisons"], "card-pairs"),
                "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in t["notes"]) + "</ul>"]
    return out + ["</section>"]


def _comparisons(run_dir: Path) -> list[str]:
    """`gazal compare --json` files saved in the run directory (compare*.json), when there are any."""
    out = []
    for path in sorted(run_dir.glob("compare*.json")):
        cmp = json.loads(path.read_text(encoding="utf-8"))
        rows = cmp.get("benchmarks", {})
        if not rows:
            continue
        out.append(f"<h3>Comparison: {html.escape(path.name)}</h3><table class='compare'><tr><th>benchmark</th>"
                   "<th>accuracy A</th><th>accuracy B</th><th>difference (95% interval)</th><th>p</th>"
                   "<th>verdict</th></tr>")
        for name, c in rows.items():
            if "accuracy_a" not in c:
                continue
            lo, hi = c.get("ci95", [None, None])
            interval = f" ({100 * lo:.1f} to {100 * hi:.1f})" if lo is not None else ""
            out.append(f"<tr><td>{html.escape(TITLES.get(name, name))}</td><td>{100 * c['accuracy_a']:.1f}</td>"
                       f"<td>{100 * c['accuracy_b']:.1f}</td><td>{100 * c['difference']:.1f}{interval}</td>"
                       f"<td>{c.get('p_value', float('nan')):.3g}</td><td>{html.escape(str(c.get('verdict', '')))}"
                       "</td></tr>")
        out.append("</table>")
    return out


def _sample_rows(run_dir: Path) -> list[dict]:
    rows = []
    for r in read_metrics(run_dir / "grpo" / "samples.jsonl"):
        accuracy = (r.get("rewards") or {}).get("accuracy")
        rows.append({"source": "grpo", "where": f"GRPO step {r['step']}",
                     "correct": None if accuracy is None else accuracy > 0, "status": "-",
                     "question": r.get("prompt") or "", "completion": r.get("completion") or "",
                     "detail": ", ".join(f"{k} {v:.2f}" for k, v in (r.get("rewards") or {}).items()
                                         if isinstance(v, (int, float)))
                     + (f"; advantage {r['advantage']:.2f}" if isinstance(r.get("advantage"), (int, float)) else "")})
    eval_dir = run_dir / "eval"
    if eval_dir.is_dir():
        for path in sorted(eval_dir.glob("*/samples.jsonl")) + sorted(eval_dir.glob("*/direct/samples.jsonl")):
            mode = "direct" if path.parent.name == "direct" else "reasoning"
            name = path.parent.parent.name if mode == "direct" else path.parent.name
            for r in read_metrics(path):
                rows.append({"source": name, "where": f"{TITLES.get(name, name).split(' (')[0]} ({mode})",
                             "correct": bool(r["correct"]), "status": r.get("status", "-"), "question": r["id"],
                             "completion": r.get("completion") or "",
                             "detail": f"gold {r.get('answer')}, predicted {r.get('prediction')}"})
    return rows


def _samples(run_dir: Path) -> list[str]:
    rows = _sample_rows(run_dir)
    if not rows:
        return ['<section id="samples"><h2>Samples</h2><p>No rollout or evaluation samples in this run.</p></section>']
    sources = sorted({r["source"] for r in rows})
    statuses = sorted({r["status"] for r in rows})

    def options(values: list[str]) -> str:
        return "<option value=''>all</option>" + "".join(f"<option>{html.escape(v)}</option>" for v in values)

    body = []
    for r in rows:
        correct = "" if r["correct"] is None else ("correct" if r["correct"] else "incorrect")
        body.append(f"<tr data-source='{html.escape(r['source'])}' data-correct='{correct}' "
                    f"data-status='{html.escape(r['status'])}'><td>{html.escape(r['where'])}</td><td>{correct or '-'}</td>"
                    f"<td>{html.escape(r['status'])}</td><td><details><summary>{html.escape(r['question'][:80])}"
                    f"</summary><pre>{html.escape(r['question'][:SAMPLE_TEXT])}</pre></details></td>"
                    f"<td><details><summary>{html.escape(r['completion'][:80])}</summary>"
                    f"<pre>{html.escape(r['completion'][:SAMPLE_TEXT])}</pre></details></td>"
                    f"<td>{html.escape(r['detail'])}</td></tr>")
    return ['<section id="samples"><h2>Samples</h2>',
            f"<p>{len(rows)} rows: GRPO rollouts (correct: the accuracy reward paid) and evaluation items.</p>",
            "<div class='filters'>",
            f"<label>source <select id='f-source'>{options(sources)}</select></label>",
            "<label>answer <select id='f-correct'><option value=''>all</option><option>correct</option>"
            "<option>incorrect</option></select></label>",
            f"<label>status <select id='f-status'>{options(statuses)}</select></label>",
            "<span id='f-count'></span></div>",
            "<table id='samples-table'><thead><tr><th>where</th><th>answer</th><th>status</th><th>question</th>"
            "<th>completion</th><th>detail</th></tr></thead><tbody>", *body, "</tbody></table></section>"]


FILTER_SCRIPT = """
(function () {
  var keys = ["source", "correct", "status"];
  function apply() {
    var want = {}, shown = 0, rows = document.querySelectorAll("#samples-table tbody tr");
    keys.forEach(function (k) { want[k] = document.getElementById("f-" + k).value; });
    rows.forEach(function (row) {
      var ok = keys.every(function (k) { return !want[k] || row.dataset[k] === want[k]; });
      row.hidden = !ok;
      if (ok) { shown += 1; }
    });
    document.getElementById("f-count").textContent = shown + " of " + rows.length + " rows";
  }
  if (!document.getElementById("samples-table")) { return; }
  keys.forEach(function (k) { document.getElementById("f-" + k).addEventListener("change", apply); });
  apply();
})();
"""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; }
figure.plot { margin: 0; border: 1px solid #ddd; padding: 0.4em; }
figure.plot svg { max-width: 520px; height: auto; }
figcaption { font-size: 0.85em; color: #555; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.85em; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.5em; vertical-align: top; text-align: left; }
pre { white-space: pre-wrap; max-width: 60em; }
.filters label { margin-right: 1em; }
"""


def write(run_dir: Path, recipe: dict, versions: dict) -> Path:
    """Write run_dir/report.html (atomically) and return its path."""
    parts = [f"<h1>Gazal run: {html.escape(str(recipe['name']))}</h1>",
             f"<p>Run directory <code>{html.escape(str(run_dir))}</code>; base model "
             f"<code>{html.escape(str(recipe['model']['name_or_path']))}</code>; "
             + html.escape(", ".join(f"{k} {v}" for k, v in versions.items() if v and k != "platform")) + "</p>",
             "<nav><a href='#card'>Stage card</a> · <a href='#sft'>SFT</a> · <a href='#grpo'>GRPO</a> · "
             "<a href='#eval'>Evaluation</a> · <a href='#samples'>Samples</a></nav>",
             *_card(run_dir), *_stage(run_dir, "sft", SFT_PANELS), *_stage(run_dir, "grpo", GRPO_PANELS), *_evaluation(run_dir),
             *_samples(run_dir)]
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>Gazal run: {html.escape(str(recipe['name']))}</title><style>{STYLE}</style></head><body>"
            + "\n".join(parts) + f"<script>{FILTER_SCRIPT}</script></body></html>")
    path = run_dir / "report.html"
    rundir.write_text(path, page)
    return path
