"""The HTML page of `filterd replay --report DIR`: ROC curve, score histograms, figures, tables.

Writes into DIR (created if needed): index.html, roc.png, scores.png and replay.json (the same
JSON `--json` prints, so a reader can check the page against it). Every number on the page
also sits in a `data-value` attribute with full precision, and the shown text is the same value
rounded as stated, so a test can compare the rendered page with the JSON.

Trusts: message names (paths) only as text: everything is HTML-escaped.
Needs matplotlib (the `report` extra); drawn with the Agg backend, no display.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any, Sequence

from filterd.replay import HAM, SPAM, MessageResult, Summary, roc_points

CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em 0; }
th, td { border: 1px solid #bbb; padding: 0.2em 0.6em; text-align: right; }
th { background: #eee; } td.name { text-align: left; font-family: monospace; }
tr.configured { background: #ffe9a8; font-weight: bold; }
img { max-width: 48%; border: 1px solid #ccc; margin-right: 1%; }
"""


def fmt_rate(value: float | None) -> str:
    """Rates as percentages with 3 decimals ("-" when undefined)."""
    return "-" if value is None else f"{value * 100:.3f}%"


def fmt_auc(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


def _cell(value: Any, text: str | None = None, cls: str = "", **data: Any) -> str:
    attrs = f' data-value="{html.escape(json.dumps(value))}"'
    attrs += "".join(f' data-{k}="{html.escape(str(v))}"' for k, v in data.items())
    if cls:
        attrs += f' class="{cls}"'
    shown = text if text is not None else ("-" if value is None else str(value))
    return f"<td{attrs}>{html.escape(shown)}</td>"


def draw_charts(results: Sequence[MessageResult], summary: Summary, directory: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in results if r.error is None and not r.tempfail]
    ham = [r.score for r in scored if r.label == HAM]
    spam = [r.score for r in scored if r.label == SPAM]

    fig, ax = plt.subplots(figsize=(6, 5), dpi=90)
    if ham and spam:
        pts = roc_points(ham, spam)
        ax.step([p[1] for p in pts], [p[2] for p in pts], where="post",
                label=f"filterd (AUC {fmt_auc(summary.auc)})")
        ax.set_xscale("symlog", linthresh=0.001)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set_xlabel("false positive rate (ham marked spam)")
    ax.set_ylabel("true positive rate (spam caught)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title("ROC from the score")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(directory / "roc.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 5), dpi=90)
    finite = [s for s in (*ham, *spam) if math.isfinite(s)]
    if finite:
        low, high = min(finite), max(finite)
        high = min(high, max(summary.levels["reject_level"] * 2, low + 1))  # GTUBE-like outliers
        bins = [low + (high - low) * i / 50 for i in range(51)] if high > low else 10
        ax.hist([min(s, high) for s in ham], bins=bins, alpha=0.6, label=f"ham ({len(ham)})")
        ax.hist([min(s, high) for s in spam], bins=bins, alpha=0.6, label=f"spam ({len(spam)})")
        ax.set_yscale("log")
    for key, style in (("tag2_level", "--"), ("kill_level", ":")):
        ax.axvline(summary.levels[key], color="black", linestyle=style, label=key)
    ax.set_xlabel("score")
    ax.set_ylabel("messages")
    ax.set_title("Score histogram")
    ax.legend()
    fig.tight_layout()
    fig.savefig(directory / "scores.png")
    plt.close(fig)


def _confusion_table(name: str, c: dict[str, Any]) -> str:
    return (f'<tr data-corpus="{html.escape(name)}"><td class="name">{html.escape(name)}</td>'
            + _cell(c["ham"], cls="ham") + _cell(c["fp"], cls="fp") + _cell(c["tn"], cls="tn")
            + _cell(c["ham_tempfail"], cls="ham_tempfail")
            + _cell(c["spam"], cls="spam") + _cell(c["tp"], cls="tp") + _cell(c["fn"], cls="fn")
            + _cell(c["spam_tempfail"], cls="spam_tempfail")
            + _cell(c["fp_rate"], fmt_rate(c["fp_rate"]), cls="fp_rate")
            + _cell(c["fn_rate"], fmt_rate(c["fn_rate"]), cls="fn_rate") + "</tr>")


def render_html(data: dict[str, Any], title: str = "filterd replay") -> str:
    esc = html.escape
    levels = data["levels"]
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
           f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>"]
    rate = data.get("messages_per_second")
    out.append(f"<p id='run'>{data['messages']} messages, {data['errors']} unreadable, "
               f"{data['scan_seconds']:.1f} s scanning"
               + (f" ({rate:g} messages/s)" if rate else "") + ". Levels: "
               + ", ".join(f"{k} {v:g}" for k, v in levels.items()) + ".</p>")
    out.append("<h2>Figures</h2><table id='figures'><tr><th>figure</th><th>value</th></tr>")
    out.append("<tr><td class='name'>ROC AUC</td>"
               + _cell(data["auc"], fmt_auc(data["auc"]), cls="auc") + "</tr>")
    at = data.get("fn_at_fp")
    if at:
        out.append(f"<tr><td class='name'>FN rate at FP &le; {at['fp_target'] * 100:g}% "
                   "of ham</td>" + _cell(at["fn_rate"], fmt_rate(at["fn_rate"]),
                                         cls="fn_at_fp") + "</tr>")
        thr = at["threshold"]
        out.append("<tr><td class='name'>threshold there</td>"
                   + _cell(thr, "-" if thr is None else f"{thr:g}", cls="fn_at_fp_threshold")
                   + "</tr>")
    out.append("</table>")
    out.append("<h2>Confusion matrix</h2><p>Spam verdict = spam, quarantine, reject or discard; "
               "tempfail is counted apart (neither FP nor FN).</p>"
               "<table id='confusion'><tr><th>corpus</th><th>ham</th><th>FP</th><th>TN</th>"
               "<th>ham tempfail</th><th>spam</th><th>TP</th><th>FN</th><th>spam tempfail</th>"
               "<th>FP rate</th><th>FN rate</th></tr>")
    for name, c in data["corpora"].items():
        out.append(_confusion_table(name, c))
    out.append(_confusion_table("overall", data["overall"]).replace("<tr ", "<tr id='overall' ", 1))
    out.append("</table>")
    out.append("<h2>Charts</h2><img src='roc.png' alt='ROC curve'>"
               "<img src='scores.png' alt='score histograms'>")
    out.append("<h2>Thresholds</h2><p>What each level would have done on this corpus. As "
               "<b>tag2_level</b>: ham marked spam (FP) and spam let through (FN). As "
               "<b>kill_level</b>: ham and spam that would have been held. Forced actions "
               "(viruses, failures) apply whatever the level. The configured levels are "
               "highlighted.</p><table id='thresholds'><tr><th>level</th><th>FP</th>"
               "<th>FN</th><th>FP rate</th><th>FN rate</th><th>ham killed</th>"
               "<th>spam killed</th><th>configured as</th></tr>")
    for row in data["thresholds"]:
        marks = [n for n, flag in (("tag2_level", row["is_tag2_level"]),
                                   ("kill_level", row["is_kill_level"])) if flag]
        cls = " class='configured'" if marks else ""
        out.append(f"<tr{cls} data-level='{row['level']:g}'>"
                   + _cell(row["level"], f"{row['level']:g}", cls="level")
                   + _cell(row["fp"], cls="fp") + _cell(row["fn"], cls="fn")
                   + _cell(row["fp_rate"], fmt_rate(row["fp_rate"]), cls="fp_rate")
                   + _cell(row["fn_rate"], fmt_rate(row["fn_rate"]), cls="fn_rate")
                   + _cell(row["ham_killed"], cls="ham_killed")
                   + _cell(row["spam_killed"], cls="spam_killed")
                   + f"<td>{esc(', '.join(marks))}</td></tr>")
    out.append("</table>")
    out.append("<h2>Symbols</h2><table id='symbols'><tr><th>symbol</th><th>ham</th>"
               "<th>spam</th><th>other</th></tr>")
    for name, counts in data["symbols"].items():
        out.append(f"<tr><td class='name'>{esc(name)}</td>" + _cell(counts["ham"], cls="ham")
                   + _cell(counts["spam"], cls="spam") + _cell(counts["other"], cls="other")
                   + "</tr>")
    out.append("</table><h2>Slowest messages</h2><table id='slowest'><tr><th>message</th>"
               "<th>ms</th><th>action</th><th>score</th></tr>")
    for row in data["slowest"]:
        out.append(f"<tr><td class='name'>{esc(row['name'])}</td>"
                   + _cell(row["seconds"], f"{row['seconds'] * 1000:.1f}")
                   + f"<td>{esc(row['action'])}</td>" + _cell(row["score"], f"{row['score']:g}")
                   + "</tr>")
    out.append("</table>")
    if data.get("changed") is not None:
        out.append(f"<h2>Actions changed by the second configuration ({len(data['changed'])})"
                   "</h2><table id='changed'><tr><th>message</th><th>label</th><th>A</th>"
                   "<th>B</th><th>score A</th><th>score B</th></tr>")
        for row in data["changed"]:
            out.append(f"<tr><td class='name'>{esc(row['name'])}</td>"
                       f"<td>{esc(str(row['label']))}</td><td>{esc(row['action_a'])}</td>"
                       f"<td>{esc(row['action_b'])}</td>"
                       + _cell(row["score_a"], f"{row['score_a']:g}")
                       + _cell(row["score_b"], f"{row['score_b']:g}") + "</tr>")
        out.append("</table>")
    out.append("</body></html>\n")
    return "\n".join(out)


def write_report(directory: Path, results: Sequence[MessageResult], summary: Summary,
                 data: dict[str, Any]) -> Path:
    """Write index.html, roc.png, scores.png and replay.json; returns the HTML path."""
    directory.mkdir(parents=True, exist_ok=True)
    draw_charts(results, summary, directory)
    (directory / "replay.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    page = directory / "index.html"
    page.write_text(render_html(data), encoding="utf-8")
    return page
