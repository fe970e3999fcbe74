"""The debug report: one self-contained HTML file (and the same data as JSON).

`write_report(data, out_dir)` writes out_dir/report.html and out_dir/report.json from the data
trace.debug_run builds (plus the optional sections other tools add: "graph", "lowering_check",
"activation_stats", "bisect"). The HTML has its CSS, script and SVG inline and names no external
resource, so it opens offline, from a file:// URL, or attached to a bug report.

Sections: a summary; the bisection's verdict (when the report comes from `splice bisect`); the
pass table (id="passes": step, pass, exact or lossy, modified, pass time, peak RSS, nodes before
-> after, the numeric check's verdict); per pass, node counts by op before
and after, weights added and dropped, the pass's own report and the IR diff (collapsible, cut to a
few hundred lines: the full IR of every step is in DIR/ir/); the numeric check explained; the
lowering check; activation statistics; the graph drawing with its legend.

The script is a few lines of progressive enhancement (expand/collapse all, highlight one origin
in the drawing); the report reads the same without it. Its last statement marks the page
(data-script="ran" on <html>), so a headless-browser test can tell that it ran to the end.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

esc = html.escape

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;padding:16px 24px;
 max-width:1400px;color:#222;background:#fff}
h1{font-size:22px;margin:4px 0 8px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:16px 0 6px}
table{border-collapse:collapse;margin:6px 0 12px}th,td{border:1px solid #ddd;padding:3px 8px;
 text-align:left;vertical-align:top}th{background:#f4f4f4}td.nw{white-space:nowrap}
td.num{text-align:right;
 font-variant-numeric:tabular-nums}
.ok{color:#18794e;font-weight:600}.bad{color:#c0392b;font-weight:600}.muted{color:#777}
.tag{display:inline-block;padding:0 6px;border-radius:8px;font-size:12px;background:#eee}
.tag.exact{background:#d9f2e3}.tag.lossy{background:#fde8cf}
pre.diff{font:12px/1.35 ui-monospace,Menlo,Consolas,monospace;background:#fafafa;
 border:1px solid #eee;padding:6px;overflow:auto;max-height:520px;white-space:pre}
.diff .a{background:#e6ffec}.diff .r{background:#ffebe9}.diff .h{color:#6f42c1}
details{margin:4px 0}summary{cursor:pointer}
.swatch{display:inline-block;width:12px;height:12px;border-radius:3px;margin-right:5px;
 vertical-align:-1px}
ul.legend{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:6px 18px}
ul.legend li{cursor:pointer}ul.legend li.on{font-weight:700}
.graphbox{overflow:auto;border:1px solid #ddd;max-height:1400px}
svg.graph text{font:11px system-ui,sans-serif;text-anchor:middle;fill:#111;pointer-events:none}
svg.graph text.s{font-size:9px;fill:#222}svg.graph .edges path{fill:none;stroke:#999;
 stroke-width:1.1}svg.graph rect{stroke:#555;stroke-width:.6}svg.graph rect.bar{stroke:none}
svg.graph g.dim{opacity:.18}
.error{border:1px solid #e0b4b4;background:#fff6f6;padding:8px 12px;border-radius:4px}
button{font:13px system-ui,sans-serif;margin-right:6px}
"""

SCRIPT = """
(function(){
  function all(open){document.querySelectorAll('details.pass').forEach(function(d){d.open=open;});}
  var e=document.getElementById('expand-all'), c=document.getElementById('collapse-all');
  if(e){e.addEventListener('click',function(){all(true);});}
  if(c){c.addEventListener('click',function(){all(false);});}
  var items=document.querySelectorAll('ul.legend li');
  items.forEach(function(li){li.addEventListener('click',function(){
    var o=li.getAttribute('data-origin'), on=!li.classList.contains('on');
    items.forEach(function(x){x.classList.remove('on');});
    if(on){li.classList.add('on');}
    document.querySelectorAll('svg.graph g.n').forEach(function(g){
      var mine=(g.getAttribute('data-origin')||'').split(' ');
      g.classList.toggle('dim', on && mine.indexOf(o)<0);
    });
  });});
  document.documentElement.setAttribute('data-script','ran');
})();
"""


def fmt(v: Any, digits: int = 3) -> str:
    """A number for a table cell: general format with `digits` significant digits."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return esc(str(v))


def numeric_verdict(num: dict | None) -> tuple[str, bool | None]:
    """A one-line reading of the numeric check record and whether it passed (None: nothing to
    judge). Exact passes: the float64 relative logit difference against its tolerance; lossy
    passes: KL, top-1 agreement and the perplexity ratio, which are reported, not judged."""
    if not num:
        return "not run", None
    if "skipped" in num:
        return f"skipped ({num['skipped']})", None
    if num.get("exact"):
        diff = num.get("float64_max_rel_diff", num.get("max_rel_diff"))
        rtol = num.get("rtol")
        if rtol is None:  # the check raised before recording its tolerance
            return f"float64 max rel diff {fmt(diff)} (failed)", False
        ok = diff is not None and float(diff) <= float(rtol)
        text = f"float64 max rel diff {fmt(diff)} {'≤' if ok else '>'} {fmt(rtol)}"
        if "float64_max_rel_diff" in num:
            text += f"; stored {fmt(num.get('max_rel_diff'))}"
        return text, ok
    parts = [f"KL {fmt(num.get('kl'))}", f"top-1 {fmt(num.get('top1_agreement'), 4)}"]
    if "ppl_ratio" in num:
        parts.append(f"ppl ×{fmt(num['ppl_ratio'], 4)}")
    return ", ".join(parts), None


def _verdict_html(num: dict | None) -> str:
    text, ok = numeric_verdict(num)
    cls = "" if ok is None else ("ok" if ok else "bad")
    return f'<span class="{cls}">{esc(text)}</span>' if cls else esc(text)


def _summary_section(d: dict) -> str:
    inp, out = d.get("input", {}), d.get("output", {})
    status = d.get("status", "ok")
    rows = [("model", d.get("model", {}).get("name") or d.get("model", {}).get("source")),
            ("architecture", d.get("model", {}).get("architecture")),
            ("recipe", f"{d['recipe']['name']} ({len(d['recipe']['passes'])} passes)"),
            ("status", status), ("created", d.get("created")),
            ("pinned batch", f"{d['batch']['shape']} — {d['batch'].get('source', '')}"),
            ("calibration", f"{d['calibration']['shape']} tokens" if d.get("calibration")
             else "none (no pass of the recipe calibrates, or no text given)"),
            ("nodes", f"{inp.get('nodes')} → {out.get('nodes')}"),
            ("parameters", f"{fmt(inp.get('parameters'))} → {fmt(out.get('parameters'))}"),
            ("weights (MB)", f"{fmt(inp.get('weight_mb'))} → {fmt(out.get('weight_mb'))}"),
            ("total time", f"{fmt(d.get('total_time_s'))} s"),
            ("IR dumps", d.get("ir_dir"))]
    body = "".join(f"<tr><th>{esc(k)}</th><td>{fmt(v) if not isinstance(v, str) else esc(v)}"
                   f"</td></tr>" for k, v in rows)
    out_html = f'<table class="summary">{body}</table>'
    err = d.get("error")
    if err:
        out_html += (f'<div class="error"><b class="bad">Stopped at pass {esc(err["pass"])} '
                     f'(step {err["step"]})</b><br>{esc(err["message"])}'
                     + (f"<br>cause: {esc(err['cause'])}" if err.get("cause") else "") + "</div>")
    return out_html


def _pass_table(d: dict, colours: dict[str, str]) -> str:
    head = ("<tr><th>step</th><th>pass</th><th>kind</th><th>modified</th><th>pass time (s)</th>"
            "<th>peak RSS (MB)</th><th>nodes before → after</th><th>verify</th>"
            "<th>numeric check</th></tr>")
    rows = []
    for p in d.get("passes", []):
        t = p.get("timing") or {}
        rss = "–" if not t else \
            f"{fmt(t.get('peak_rss_mb'), 4)} (+{fmt(t.get('peak_rss_delta_mb'))})"
        after = p.get("after") or {}
        kind = "exact" if p.get("exact") else "lossy"
        sw = colours.get(p["name"])
        swatch = f'<span class="swatch" style="background:{sw}"></span>' if sw else ""
        verify = p.get("verify")
        vtext = '<span class="ok">ok</span>' if verify and verify.get("ok") else "–"
        failed = d.get("error") and d["error"]["step"] == p["step"]
        mod = "failed" if failed and p.get("modified") is None else fmt(p.get("modified"))
        rows.append(
            f'<tr><td class="num">{p["step"]}</td><td class="nw">{swatch}'
            f'<a href="#pass-{p["step"]}">'
            f'{esc(p["name"])}</a></td><td><span class="tag {kind}">{kind}</span></td>'
            f'<td{" class=bad" if failed else ""}>{mod}</td><td class="num">{fmt(p.get("time_s"))}'
            f'</td><td class="num">{rss}</td><td class="num">{fmt(p["before"]["nodes"])} → '
            f'{fmt(after.get("nodes"))}</td><td>{vtext}</td><td>{_verdict_html(p.get("numeric"))}'
            "</td></tr>")
    return f'<table id="passes">{head}{"".join(rows)}</table>'


def _op_table(before: dict, after: dict | None) -> str:
    after = after or {}
    ops = sorted(set(before) | set(after))
    rows = []
    for op in ops:
        b, a = before.get(op, 0), after.get(op, 0)
        cls = ' class="bad"' if a != b else ""
        rows.append(f"<tr><td>{esc(op)}</td><td class=num>{b}</td><td class=num{cls}>{a}</td></tr>")
    return f"<table><tr><th>op</th><th>before</th><th>after</th></tr>{''.join(rows)}</table>"


def _diff_html(diff: dict | None) -> str:
    if diff is None:
        return '<p class="muted">not modified: no IR change</p>'
    out = []
    for line in diff["lines"]:
        cls = "h" if line.startswith("@@") else "a" if line.startswith("+") else \
            "r" if line.startswith("-") else ""
        out.append(f'<span class="{cls}">{esc(line)}</span>' if cls else esc(line))
    note = (f'<p class="muted">diff cut to {len(diff["lines"])} of {diff["total_lines"]} lines; '
            "the full IR of each step is in the IR dump directory</p>") if diff["truncated"] else ""
    return (f"<details><summary>IR diff: +{diff['added']} −{diff['removed']} lines</summary>"
            f'{note}<pre class="diff">{chr(10).join(out)}</pre></details>')


def _short_list(names: list[str], limit: int = 12) -> str:
    if not names:
        return "none"
    text = ", ".join(names[:limit])
    return esc(text + (f", … ({len(names) - limit} more)" if len(names) > limit else ""))


def _pass_details(d: dict) -> str:
    out = []
    for p in d.get("passes", []):
        settings = json.dumps(p.get("settings", {}), sort_keys=True)
        own = json.dumps(p.get("pass_report") or {}, indent=1, sort_keys=True)
        if len(own) > 6000:
            own = own[:6000] + "\n… (cut; see report.json)"
        open_ = " open" if p.get("modified") else ""
        after_ops = (p.get("after") or {}).get("ops")
        out.append(
            f'<details class="pass" id="pass-{p["step"]}"{open_}><summary><b>{p["step"]}. '
            f'{esc(p["name"])}</b> {esc(settings)} — {_verdict_html(p.get("numeric"))}</summary>'
            f'<div style="display:flex;gap:24px;flex-wrap:wrap"><div>'
            f'<h3>nodes by op</h3>{_op_table(p["before"]["ops"], after_ops)}'
            '</div><div style="flex:1;min-width:320px"><h3>weights</h3>'
            f'<p>added: {_short_list(p.get("weights_added", []))}<br>'
            f'dropped: {_short_list(p.get("weights_removed", []))}</p>'
            f'<details><summary>pass report</summary><pre class="diff">{esc(own)}</pre>'
            '</details></div></div>'
            f'{_diff_html(p.get("diff"))}</details>')
    return "".join(out)


NUMERIC_NOTE = (
    "Every modifying pass runs the pinned batch through the reference interpreter in float64 "
    "before and after. An exact pass must keep max |Δlogit| / max |logit| within the tolerance "
    "(1e-9) on a float64 copy of its input; its stored result (weights below float64) only within "
    "rounding. A lossy pass reports its error instead: KL(before ‖ after) per token, top-1 "
    "agreement, and the perplexity ratio of the batch's next tokens (a perplexity proxy).")


def _lowering_section(lc: dict | None) -> str:
    if not lc:
        return ""
    head = "<h2>Lowering check (ONNX Runtime, graph optimisations off)</h2>"
    if lc.get("error"):
        return head + f'<div class="error">{esc(lc["error"])}</div>'
    verdict = ('<p class="ok">every IR value agrees</p>' if lc["ok"] else
               f'<p class="bad">first divergence: {esc(lc["first"]["describe"])}</p>')
    rows = []
    for v in lc.get("values", []):
        cls = "" if v["ok"] else ' class="bad"'
        rows.append(f"<tr{cls}><td>%{esc(v['name'])}</td><td>{esc(v['op'])}</td>"
                    f"<td>{esc(v['role'])}</td><td>{fmt(v['layer'])}</td><td>{esc(v['origin'])}"
                    f"</td><td class=num>{fmt(v['max_abs'])}</td><td class=num>"
                    f"{fmt(v['max_rel'])}</td></tr>")
    table = ("<details><summary>every value, in topological order</summary><table><tr><th>value"
             "</th><th>op</th><th>role</th><th>layer</th><th>origin</th><th>max |Δ|</th>"
             f"<th>max rel</th></tr>{''.join(rows)}</table></details>")
    return (head + verdict + f"<p class=muted>{lc['checked']} values compared at atol "
            f"{fmt(lc['atol'])}, rtol {fmt(lc['rtol'])} (of each tensor's max |value|) against the "
            "float64 reference</p>" + table)


def _stats_section(st: dict | None) -> str:
    if not st:
        return ""
    from splice.ir.stats import stats_html

    return "<h2>Activation statistics</h2>" + "".join(
        f"<h3>{esc(label)}</h3>{stats_html(s)}" for label, s in st.items())


def _bisect_section(b: dict | None) -> str:
    if not b:
        return ""
    rows = "".join(
        f"<tr><td class=num>{s['step']}</td><td>{esc(s['name'])}</td><td class=num>"
        f"{fmt(s['value'], 4)}</td><td>{'<b class=bad>crosses</b>' if s['crosses'] else 'ok'}"
        "</td></tr>" for s in b.get("steps", []))
    probes = "".join(f"<tr><td class=num>{p['layers_kept']}</td><td class=num>"
                     f"{fmt(p['value'], 4)}</td><td>{'crosses' if p['crosses'] else 'ok'}</td>"
                     "</tr>" for p in b.get("layer_probes", []))
    return (f"<h2>Bisection</h2><p><b>{esc(b['summary'])}</b></p><table><tr><th>step</th>"
            f"<th>pass</th><th>{esc(b['metric'])}</th><th>tolerance {fmt(b['tolerance'])}</th>"
            f"</tr>{rows}</table>" + (
                "<h3>layer search inside the pass (its changes kept for layers ≤ L)</h3><table>"
                f"<tr><th>L</th><th>{esc(b['metric'])}</th><th></th></tr>{probes}</table>"
                if probes else "") + f"<p class=muted>{esc(b.get('layer_note') or '')}</p>")


def _graph_section(g: dict | None) -> str:
    if not g:
        return ""
    legend = "".join(
        f'<li data-origin="{esc(o)}"><span class="swatch" style="background:'
        f'{g["colours"].get(o, "#ccc")}"></span>{esc(o)} ({n} nodes)</li>'
        for o, n in g["origins"].items())
    return (f"<h2>Graph after the run</h2><p class=muted>layer {g['expanded_layer']} expanded, "
            "every other layer collapsed to one box (its bar: the origins of its nodes); nodes "
            "coloured by the pass or frontend that made them (node.origin); click a legend entry "
            f'to highlight it; hover a node for details.</p><ul class="legend">{legend}</ul>'
            f'<div class="graphbox">{g["svg"]}</div>')


def render(d: dict) -> str:
    """The report's HTML text for report data `d`."""
    colours = (d.get("graph") or {}).get("colours", {})
    body = [f"<h1>{esc(d.get('title', 'splice debug report'))}</h1>",
            _summary_section(d), _bisect_section(d.get("bisect")),
            "<h2>Passes</h2>", _pass_table(d, colours),
            '<p><button id="expand-all" type="button">expand all</button>'
            '<button id="collapse-all" type="button">collapse all</button></p>',
            _pass_details(d), f"<h2>Numeric check</h2><p>{esc(NUMERIC_NOTE)}</p>",
            _lowering_section(d.get("lowering_check")),
            _stats_section(d.get("activation_stats")), _graph_section(d.get("graph"))]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(d.get('title', 'splice debug report'))}</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}<script>{SCRIPT}</script>"
            "</body></html>\n")


def write_report(d: dict, out_dir: str | Path) -> Path:
    """Write out_dir/report.html and out_dir/report.json; returns the HTML path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(d, indent=1, sort_keys=True))
    path = out_dir / "report.html"
    path.write_text(render(d), encoding="utf-8")
    log.info("debug report written to %s", path)
    return path
