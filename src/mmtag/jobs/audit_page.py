"""audit.html: one self-contained page of an audit (thumbnails embedded), issues grouped by kind
and ranked, and a per-label table. Drawn from an `AuditResult`; reads only the thumbnails."""
from __future__ import annotations

import base64
import html
import io

from ..data import ImageDecodeError, decode_thumbnail
from ..errors import MmtagError
from .audit_findings import KINDS, AuditResult, Issue

SHOWN = 40  # issues of each kind shown with their thumbnail and caption (issues.csv has them all)
THUMB = 120

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{width:260px;border:1px solid #ddd;padding:6px;
border-radius:6px;font-size:13px}.card img{max-width:%dpx;max-height:%dpx;display:block}
.kind{font-weight:bold}.score{color:#666}.rare{color:#b00}""" % (THUMB, THUMB)


def _thumb(data, i: int) -> str:
    if data.images_dir is None:
        return ""
    try:
        img = decode_thumbnail(data.image_path(i), THUMB)
    except (ImageDecodeError, OSError, MmtagError):
        return "<div>(image not readable)</div>"
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return f'<img alt="" src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _card(result: AuditResult, issue: Issue, index: dict[int, int]) -> str:
    data = result.data
    i = index.get(issue.row)
    labels = caption = thumb = ""
    if i is not None and issue.kind != "leak":
        thumb = _thumb(data, i)
        caption = html.escape(data.captions[i])
        labels = " ".join(html.escape(result.label_tokens[k]) for k in
                          (j for j, on in enumerate(_given(result, i)) if on))
    return (f'<div class="card">{thumb}<div class="kind">row {issue.row} · '
            f'{html.escape(issue.image_id)}{" · " + html.escape(issue.label) if issue.label else ""}</div>'
            f'<div>{caption}</div><div>labels: {labels}</div>'
            f'<div class="score">{html.escape(issue.evidence)} · score {issue.score:.3f}</div></div>')


def _given(result: AuditResult, i: int) -> list[bool]:
    ids = result.data.labels[i] if result.data.labels else []
    tokens = result.label_tokens
    vocab = result.data.vocab
    have = {vocab.token(k) for k in ids}
    return [t in have for t in tokens]


def render(result: AuditResult) -> str:
    counts = result.counts()
    index = {(result.data.rows[i] if result.data.rows else i + 1): i for i in range(len(result.data))}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>mmtag audit</title>"
             f"<style>{STYLE}</style></head><body><h1>Audit of {html.escape(str(result.data.path))}</h1>",
             f"<p>{len(result.data)} rows; {len(result.issues)} suspected issues. Label issues come "
             "from out-of-fold scores (each row scored by a model that never trained on it) by "
             "confident learning (cleanlab); the full list is in issues.csv.</p>",
             "<table><tr><th>kind</th><th>issues</th></tr>"
             + "".join(f"<tr><td><a href='#{k.replace(' ', '-')}'>{k}</a></td><td>{n}</td></tr>"
                       for k, n in counts.items()) + "</table>",
             "<h2>Per label</h2><table><tr><th>label</th><th>rows</th><th>wrong</th>"
             "<th>missing</th><th>estimated noise rate</th><th></th></tr>"
             + "".join(f"<tr><td>{html.escape(s.label)}</td><td>{s.rows}</td><td>{s.wrong}</td>"
                       f"<td>{s.missing}</td><td>{s.noise_rate:.1%}</td><td class='rare'>"
                       f"{'too rare to learn' if s.rare else ''}</td></tr>" for s in result.labels)
             + "</table>"]
    for kind in KINDS:
        found = [i for i in result.issues if i.kind == kind]
        parts.append(f"<h2 id='{kind.replace(' ', '-')}'>{kind} ({len(found)})</h2>")
        if found:
            parts.append('<div class="cards">' + "".join(_card(result, i, index) for i in found[:SHOWN])
                         + "</div>")
            if len(found) > SHOWN:
                parts.append(f"<p>… and {len(found) - SHOWN} more in issues.csv</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
