"""A report as one page a study coordinator can read: report.html beside
report.json (plan.html beside plan.json, verify.html beside verify.json),
for runs, plans and audits alike.

One self-contained file: styles, charts (inline SVG, drawn here) and the
small script that sorts a table by a clicked column are all inside it, so
it opens anywhere, offline. It stays small for a run of a million images:
every table is capped, with a count of what is not shown; the full lists
stay in the JSON report and the stored listing. Figures a test reads back
from the rendered page carry data-total attributes.
"""
import collections
import html
import posixpath
import re
from typing import Any, Dict, Iterable, List, Sequence, Tuple

from transforms.records import duration

MAX_STUDY_ROWS = 1000     # studies shown, over all entities
MAX_FILE_ROWS = 200       # files shown per list (flagged, rejected ...)
MAX_BARS = 12             # bars per chart; the rest summed as "other"

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;
max-width:72em;padding:0 1em;color:#1d2733}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:2em;
border-bottom:1px solid #d5dbe3;padding-bottom:.2em}h3{font-size:1em;margin:1.2em 0 .3em}
.sub{color:#5b6776}.plan{background:#fff4d6;border:1px solid #e8c66a;padding:.5em .8em}
table{border-collapse:collapse;margin:.4em 0}td,th{padding:.25em .7em;text-align:left;
border-bottom:1px solid #e6eaef;vertical-align:top}th{background:#f3f5f8;cursor:pointer}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.summary td:first-child{color:#5b6776}.more{color:#5b6776;font-style:italic}
.charts{display:flex;flex-wrap:wrap;gap:2em}.chart h3{margin-top:.5em}
.written{color:#176b2c}.skipped,.to-skip{color:#5b6776}.failed,.flagged{color:#a3261b}
code{font-size:.92em;word-break:break-all}
"""

# Sorts a table by the clicked header (numbers as numbers); the page reads
# the same without it.
_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(function (th, col) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var down = th.dataset.down !== "1";
    th.dataset.down = down ? "1" : "0";
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v || a.cells[col].textContent;
      var y = b.cells[col].dataset.v || b.cells[col].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
      return down ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
document.body.dataset.ready = "1";
"""

_e = html.escape


def _bytes(n: Any) -> str:
  if n is None:
    return ""
  n = float(n)
  for unit in ("B", "kB", "MB", "GB", "TB"):
    if n < 1000 or unit == "TB":
      return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
    n /= 1000
  return ""


def reason_kind(reason: str) -> str:
  """A reason without what is particular to one file: its first clause,
  UIDs and paths taken out, for grouping files by why."""
  kind = reason.split(":", 1)[0]
  kind = re.sub(r"\b\d+(\.\d+){2,}\b", "…", kind)
  return kind.strip() or reason[:60]


def _shorten(text: str, width: int) -> str:
  return text if len(text) <= width else text[:width - 1] + "…"


def bar_chart(title: str, bars: Sequence[Tuple[str, float]], unit=str,
              key: str = "") -> str:
  """A horizontal bar chart as inline SVG, largest first, at most MAX_BARS
  bars (the rest summed as 'other')."""
  bars = sorted(bars, key=lambda b: -b[1])
  if len(bars) > MAX_BARS:
    rest = sum(v for _, v in bars[MAX_BARS - 1:])
    bars = bars[:MAX_BARS - 1] + [(f"other ({len(bars) - MAX_BARS + 1})",
                                   rest)]
  if not bars:
    return (f'<div class="chart"><h3>{_e(title)}</h3>'
            '<p class="sub">none</p></div>')
  top = max(v for _, v in bars) or 1
  row, label_w, bar_w = 22, 240, 260
  parts = [f'<svg role="img" aria-label="{_e(title)}" width="{label_w + bar_w + 110}"'
           f' height="{row * len(bars) + 4}" xmlns="http://www.w3.org/2000/svg">']
  for i, (label, value) in enumerate(bars):
    y = i * row + 2
    width = max(1, round(bar_w * value / top))
    parts.append(
        f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end" '
        f'font-size="12">{_e(_shorten(label, 38))}</text>'
        f'<rect x="{label_w}" y="{y + 3}" width="{width}" height="{row - 7}" '
        f'fill="#3b6ea8"><title>{_e(label)}: {_e(unit(value))}</title></rect>'
        f'<text x="{label_w + width + 5}" y="{y + 15}" font-size="12" '
        f'data-bar="{_e(key)}" data-label="{_e(label)}" data-v="{value}">'
        f'{_e(unit(value))}</text>')
  parts.append("</svg>")
  return f'<div class="chart"><h3>{_e(title)}</h3>{"".join(parts)}</div>'


def _table(headers: Sequence[str], rows: Iterable[Sequence[Tuple[str, Any]]],
           numeric: Sequence[int] = ()) -> str:
  """rows: cells as (text, sort value or None)."""
  head = "".join(f'<th class="{"n" if i in numeric else ""}">{_e(h)}</th>'
                 for i, h in enumerate(headers))
  body = []
  for cells in rows:
    tds = []
    for i, (text, value) in enumerate(cells):
      attrs = ' class="n"' if i in numeric else ""
      if value is not None:
        attrs += f' data-v="{_e(str(value))}"'
      tds.append(f"<td{attrs}>{text}</td>")
    body.append("<tr>" + "".join(tds) + "</tr>")
  return (f'<table class="sortable"><thead><tr>{head}</tr></thead>'
          f'<tbody>{"".join(body)}</tbody></table>')


_SUMMARY_LABELS = [
    ("entities", "entities", None), ("images_seen", "files seen", None),
    ("kept", "images kept", None), ("flagged", "flagged (PHI)", None),
    ("rejected", "rejected", None), ("failed", "failed", None),
    ("studies", "studies", None),
    ("input_bytes_kept", "bytes of images kept", _bytes),
    ("objects", "objects written", None),
    ("object_bytes", "bytes written", _bytes),
    ("objects_rows_completed", "objects in place, rows completed", None),
    ("studies_skipped", "studies skipped (already stored)", None),
    ("studies_to_write", "studies to write", None),
    ("input_bytes_to_write", "bytes of images to write", _bytes),
    ("studies_to_complete_rows", "studies to complete rows", None),
    ("studies_to_skip", "studies to skip (already stored)", None),
    ("rows", "rows written", None), ("dead_letter_rows", "dead-letter rows", None),
    ("input_bytes_read", "input bytes read", _bytes),
    ("seconds", "time taken", lambda s: duration(s, True)),
]


# Summary figures kept for the benchmark, not for a reader.
_INTERNAL = {"header_bytes_spilled"}


def _summary(summary: Dict[str, Any]) -> str:
  rows = []
  known = {k for k, _, _ in _SUMMARY_LABELS}
  for key, label, fmt in _SUMMARY_LABELS + [
      (k, k.replace("_", " "), None) for k in sorted(summary)
      if k not in known | _INTERNAL and isinstance(summary[k], (int, float))]:
    if key not in summary:
      continue
    value = summary[key]
    shown = fmt(value) if fmt else f"{value:,}"
    rows.append(f'<tr><td>{_e(label)}</td><td class="n" data-total="{_e(key)}"'
                f' data-v="{value}">{_e(shown)}</td></tr>')
  return f'<table class="summary">{"".join(rows)}</table>'


def _studies(studies: List[Dict[str, Any]]) -> str:
  by_entity = collections.OrderedDict()
  for study in sorted(studies, key=lambda s: (s["entity_id"], s["uri"])):
    by_entity.setdefault(study["entity_id"], []).append(study)
  out, shown = [], 0
  for entity, items in by_entity.items():
    if shown >= MAX_STUDY_ROWS:
      break
    take = items[:MAX_STUDY_ROWS - shown]
    shown += len(take)
    images = sum(s["instances"] for s in items)
    out.append(f"<h3>{_e(entity)} <span class=sub>{len(items):,} studies, "
               f"{images:,} images</span></h3>")
    out.append(_table(
        ["object", "images", "image bytes", "object bytes", "outcome"],
        ([(f'<code title="{_e(s["uri"])}">'
           f'{_e(posixpath.basename(s["uri"]))}</code>', None),
          (f'{s["instances"]:,}', s["instances"]),
          (_bytes(s.get("input_bytes")), s.get("input_bytes")),
          (_bytes(s.get("size_bytes")), s.get("size_bytes") or 0),
          (f'<span class="{_e(s["outcome"].replace(" ", "-"))}">'
           f'{_e(s["outcome"])}</span>', None)] for s in take),
        numeric=(1, 2, 3)))
  hidden = len(studies) - shown
  if hidden > 0:
    out.append(f'<p class="more" data-hidden="studies">{hidden:,} more '
               "studies not shown: see the JSON report.</p>")
  return "".join(out) or "<p class=sub>none</p>"


def _files(items: List[Dict[str, Any]], status: str) -> str:
  if not items:
    return "<p class=sub>none</p>"
  out = _table(["file", "entity", "reason"], [
      [(f"<code>{_e(i['path'])}</code>", None),
       (_e(i.get("entity_id", "")), None), (_e(i.get("reason", "")), None)]
      for i in items[:MAX_FILE_ROWS]])
  if len(items) > MAX_FILE_ROWS:
    out += (f'<p class="more" data-hidden="{_e(status)}">'
            f"{len(items) - MAX_FILE_ROWS:,} more not shown: see the JSON "
            "report.</p>")
  return out


def _problems(report: Dict[str, Any]) -> List[str]:
  """An audit's problems, a table per kind (capped), with what each kind
  means."""
  problems, kinds = report["problems"], report.get("kinds", {})
  counts = {k: len(v) for k, v in problems.items() if v}
  parts = ['<div class="charts">',
           bar_chart("Problems by kind", list(counts.items()),
                     lambda v: f"{v:,.0f}", "problem"), "</div>"]
  if not counts:
    parts.append('<p class="written" data-verdict="ok">Everything holds: '
                 "no problem found.</p>")
  for kind, items in problems.items():
    if not items:
      continue
    columns = sorted({k for item in items[:MAX_FILE_ROWS] for k in item}
                     - {"object"})
    parts.append(f'<h3>{_e(kind)} ({len(items):,})</h3><p class=sub>'
                 f'{_e(kinds.get(kind, ""))}</p>')
    parts.append(_table(["object", *columns], [
        [(f"<code>{_e(str(item.get('object', '')))}</code>", None),
         *[(_e(str(item.get(c, ""))), None) for c in columns]]
        for item in items[:MAX_FILE_ROWS]]))
    if len(items) > MAX_FILE_ROWS:
      parts.append(f'<p class="more" data-hidden="{_e(kind)}">'
                   f"{len(items) - MAX_FILE_ROWS:,} more not shown: see the "
                   "JSON report.</p>")
  return parts


def render(report: Dict[str, Any], title: str = "") -> str:
  """The page of a report: a run's or a plan's (transforms/report.py
  build_report's form), or an audit's (pipeline.verify: 'problems' by
  kind instead of studies)."""
  plan = report.get("plan")
  kind = ("audit" if "problems" in report else "plan" if plan else "run")
  title = title or f"DICOM storage {kind} {report.get('run_id', '')}"
  parts = [
      "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
      '<meta name="viewport" content="width=device-width,initial-scale=1">',
      f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
      f"<h1>{_e(title)}</h1>",
      f'<p class=sub>collection <b>{_e(str(report.get("collection", "")))}'
      f'</b> · pipeline {_e(str(report.get("pipeline_version", "")))}'
      + (f' · bucket <code>{_e(report["bucket"])}</code>'
         if report.get("bucket") else "") + "</p>",
  ]
  if plan:
    parts.append('<p class="plan">A plan: nothing was written. It says what '
                 "a run on the same input would store, skip, flag and "
                 "reject.</p>")
  parts += ["<h2>Summary</h2>", _summary(report.get("summary", {}))]
  if "problems" in report:
    parts += ["<h2>Problems</h2>", *_problems(report)]
  else:
    parts += _storage_sections(report)
  parts.append(f"<script>{_SCRIPT}</script></body></html>")
  return "".join(parts)


def _storage_sections(report: Dict[str, Any]) -> List[str]:
  """A run's or a plan's charts, studies and files not stored."""
  studies = report.get("studies", [])
  modalities = collections.Counter()
  bytes_by_entity = collections.Counter()
  for study in studies:
    modalities.update(study.get("modalities", {}))
    bytes_by_entity[study["entity_id"]] += study.get("input_bytes") or 0
  excluded = collections.Counter(
      f"{status}: {reason_kind(item['reason'])}"
      for status in ("flagged", "rejected", "failed")
      for item in report.get(status, []))
  parts = ['<div class="charts">',
           bar_chart("Images per modality", list(modalities.items()),
                     lambda v: f"{v:,.0f}", "modality"),
           bar_chart("Image bytes per entity", list(bytes_by_entity.items()),
                     _bytes, "entity"),
           bar_chart("Files not stored, by reason", list(excluded.items()),
                     lambda v: f"{v:,.0f}", "reason"),
           "</div>",
           f"<h2>Studies ({len(studies):,})</h2>", _studies(studies)]
  for status, heading in (("flagged", "Flagged (possible PHI: never stored)"),
                          ("rejected", "Rejected (bad input)"),
                          ("failed", "Failed (could not be stored)")):
    items = report.get(status, [])
    parts += [f"<h2>{_e(heading)} ({len(items):,})</h2>",
              _files(items, status)]
  return parts


def html_path(report_path: str) -> str:
  """report.json -> report.html (plan.json -> plan.html), beside it."""
  base = report_path[:-len(".json")] if report_path.endswith(".json") else (
      report_path)
  return base + ".html"
