"""Export a saved session as Markdown, one self-contained HTML file (media embedded), or JSON."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

FORMATS = ("md", "html", "json")


def export_session(memory, session_id: str, fmt: str = "md", out: Path | None = None) -> Path:
    """Write the export; `out` defaults to `session-<id>.<fmt>` in the current folder, and an existing
    folder as `out` gets that file inside it. Written atomically: a failure leaves no partial file."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    data = memory.export(session_id)
    sid = data["session"]["id"]
    name = f"session-{sid}.{fmt}"
    out = Path(out) if out else Path.cwd() / name
    if out.is_dir():
        out = out / name
    render = {"md": to_markdown, "html": to_html, "json": lambda d: json.dumps(d, indent=2, ensure_ascii=False)}[fmt]
    text = render(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _title(data: dict) -> str:
    s = data["session"]
    return f"{s['title'] or 'untitled'} (session {s['id']}, profile {s['profile']})"


def _media_line(m: dict) -> str:
    dims = []
    if m.get("width"):
        dims.append(f"{m['width']}x{m['height']}")
    if m.get("frames"):
        dims.append(f"{m['frames']} frames")
    if m.get("duration"):
        dims.append(f"{m['duration']:.2f} s")
    return f"{m['modality']} {'attached' if m['direction'] == 'in' else 'generated'}: {m['path']}" + (f" ({', '.join(dims)})" if dims else "")


def to_markdown(data: dict) -> str:
    lines = [f"# {_title(data)}", ""]
    for t in data["turns"]:
        who = {"user": "You", "assistant": "Assistant"}.get(t["role"], t["role"])
        lines += [f"**{who}** · {t['created_at']}", "", t["text"] or "", ""]
        for m in t["media"]:
            if m["modality"] == "image":
                lines.append(f"![{m['modality']}]({Path(m['path']).as_uri()})")
            lines.append(f"- {_media_line(m)}")
        if t["media"]:
            lines.append("")
    return "\n".join(lines)


def _data_uri(m: dict) -> str:
    return f"data:{m['mime']};base64," + base64.b64encode(Path(m["path"]).read_bytes()).decode()


def to_html(data: dict) -> str:
    """One file, no external references: media are embedded as data URIs."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(_title(data))}</title>",
        "<style>body{font-family:sans-serif;max-width:46em;margin:2em auto}"
        ".user{background:#eef}.assistant{background:#efe}.turn{padding:.6em 1em;margin:.6em 0;border-radius:8px}"
        ".meta{color:#666;font-size:.8em}img,video{max-width:100%;image-rendering:pixelated}</style></head><body>",
        f"<h1>{html.escape(_title(data))}</h1>",
    ]
    for t in data["turns"]:
        role = t["role"]
        parts.append(f"<div class='turn {html.escape(role)}'><div class='meta'>{html.escape(role)} · {html.escape(t['created_at'])}</div>")
        parts.append(f"<p>{html.escape(t['text'] or '').replace(chr(10), '<br>')}</p>")
        for m in t["media"]:
            if not Path(m["path"]).is_file():
                parts.append(f"<p class='meta'>missing media {html.escape(m['sha256'])}</p>")
                continue
            src = _data_uri(m)
            tag = {"image": f"<img src='{src}' alt='image' width='{(m.get('width') or 64) * 4}'>",
                   "video": f"<video controls loop src='{src}'></video>",
                   "audio": f"<audio controls src='{src}'></audio>"}[m["modality"]]
            parts.append(f"{tag}<div class='meta'>{html.escape(_media_line(m))}</div>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)
