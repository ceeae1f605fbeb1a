"""`nextgpt doctor --repair`: collect what killed or crashed runs left behind, and report what cannot
be repaired.

    removed   media rows no turn references and blob files no media row references (`Memory.gc`);
              output files (`outputs/<sha256>.png|wav|mp4`) no session holds — the media of a turn
              whose process was killed before its reply was saved — and temp files there;
              temp folders of killed model builds in the cache (a GGUF dequantised into the cache)
    reported  sessions whose media files are gone from the blob store (they cannot be re-run)

Everything younger than `grace_seconds` is kept: a turn being written right now is not an orphan.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

OUTPUT_EXTS = (".png", ".wav", ".mp4")  # what the decoders write (video previews, .gif, are left alone)
_SHA_NAME = re.compile(r"^[0-9a-f]{64}$")
_BUILD_TMP = re.compile(r"^\..+-pid(\d+)-")


@dataclass
class RepairReport:
    media_rows: int = 0
    blob_files: int = 0
    orphan_outputs: list[Path] = field(default_factory=list)
    temp_files: list[Path] = field(default_factory=list)
    damaged: dict[str, list[str]] = field(default_factory=dict)  # session id → missing blob sha256s


def repair(memory, output_dir: Path, cache_dir: Path, *, grace_seconds: float = 3600.0) -> RepairReport:
    from nextgpt.llm import _alive

    report = RepairReport()
    counts = memory.gc(grace_seconds=grace_seconds)
    report.media_rows, report.blob_files = counts["media_rows"], counts["blob_files"]
    cutoff = time.time() - grace_seconds
    known: set[str] = set()
    for s in memory.list_sessions():
        for t in memory.turns(s.id):
            for m in t.media:
                known.add(m.sha256)
                if not Path(m.path).is_file():
                    report.damaged.setdefault(s.id, []).append(m.sha256)
    output_dir = Path(output_dir)
    if output_dir.is_dir():
        for f in output_dir.iterdir():
            try:
                old = f.stat().st_mtime < cutoff
            except OSError:
                continue
            if not old or not f.is_file():
                continue
            if f.name.startswith(".tmp-"):
                report.temp_files.append(f)
            elif f.suffix in OUTPUT_EXTS and _SHA_NAME.match(f.stem) and f.stem not in known:
                report.orphan_outputs.append(f)
    for f in report.temp_files + report.orphan_outputs:
        f.unlink(missing_ok=True)
    cache_dir = Path(cache_dir)
    if cache_dir.is_dir():
        for d in cache_dir.rglob(".*-pid*-*"):
            m = _BUILD_TMP.match(d.name)
            if m and d.is_dir() and not _alive(int(m.group(1))):
                shutil.rmtree(d, ignore_errors=True)
                report.temp_files.append(d)
    return report
