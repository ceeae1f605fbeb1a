"""`nextgpt replay ID`: show a saved session; `--rerun`: re-execute it and compare with what was saved."""

from __future__ import annotations

import difflib
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table


def replay(memory, session_id: str, console: Console | None = None) -> int:
    from bots.render import describe, image_preview, printable

    console = console or Console()
    session = memory.get_session(session_id)
    console.print(f"[bold]session {session.id}[/bold] · {session.title or 'untitled'} · profile {session.profile} · {session.turn_count} turns")
    for t in memory.turns(session.id):
        who = {"user": "[bold cyan]you[/]", "assistant": "[bold green]assistant[/]"}.get(t.role, t.role)
        console.print(f"\n{who} [dim]{t.created_at.astimezone().strftime('%Y-%m-%d %H:%M:%S')}[/dim]")
        if t.text:
            console.print(printable(t.text), markup=False, highlight=False)
        for m in t.media:
            console.print(("  ↑ " if m.direction == "in" else "  ↓ ") + describe(m), markup=False, highlight=False)
            if m.modality == "image":
                preview = image_preview(m.path)
                if preview:
                    console.file.write(preview + "\n")
    return 0


def _media_difference(a: Path, b: Path, modality: str) -> str:
    """A human-readable difference measure between two media files of one modality."""
    import numpy as np

    try:
        if modality == "image":
            from PIL import Image

            x, y = (np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for p in (a, b))
            return f"mean |Δpixel| {np.abs(x - y).mean():.2f}/255" if x.shape == y.shape else f"sizes differ {x.shape} vs {y.shape}"
        if modality == "audio":
            import soundfile as sf

            x, y = sf.read(a)[0], sf.read(b)[0]
            n = min(len(x), len(y))
            return f"RMS Δ {np.sqrt(np.mean((x[:n] - y[:n]) ** 2)):.4f}" + ("" if len(x) == len(y) else f", lengths {len(x)} vs {len(y)}")
        from nextgpt.media import load_video

        x, y = (load_video(p)[0].astype(np.float32) for p in (a, b))
        return f"mean |Δpixel| {np.abs(x - y).mean():.2f}/255" if x.shape == y.shape else f"shapes differ {x.shape} vs {y.shape}"
    except Exception as e:  # a file that no longer decodes is itself the difference
        return f"cannot compare ({e})"


def rerun(settings, memory, session_id: str, *, profile: str | None = None, console: Console | None = None) -> int:
    """Re-run every user turn, in order, with the seeds and settings recorded for its reply, in a
    scratch memory; report per turn whether the text and each media file are identical."""
    from assistant.agent import Assistant
    from assistant.session import Chat, ChatSettings
    from memory import Memory

    console = console or Console()
    session = memory.get_session(session_id)
    turns = memory.turns(session.id)
    missing = [(t.index, m) for t in turns if t.role == "user" for m in t.media_in if not Path(m.path).is_file()]
    if missing:  # checked before anything runs
        index, m = missing[0]
        raise ValueError(
            f"turn {index}'s {m.modality} input ({m.sha256[:12]}) is missing from the blob store, so the session "
            f"cannot be re-run ({len(missing)} input(s) missing; `nextgpt doctor --repair` lists damaged sessions)"
        )
    table = Table("turn", "text", "media", "difference")
    identical = True
    with tempfile.TemporaryDirectory(prefix="nextgpt-rerun-") as tmp:
        assistant = Assistant(settings, profile or session.profile, output_dir=Path(tmp) / "outputs")
        scratch = Memory.open(data_dir=Path(tmp) / "memory")
        chat = Chat.start(assistant, scratch)
        for i, turn in enumerate(turns):
            if turn.role != "user":
                continue
            recorded = turns[i + 1] if i + 1 < len(turns) and turns[i + 1].role == "assistant" else None
            s = (recorded.settings if recorded else None) or {}
            chat.settings = ChatSettings.pinned(s)  # the turn's saved settings, as a regenerate pins them
            chat.staged = [(m.modality, m.path) for m in turn.media_in]
            with console.status(f"re-running turn {turn.index}…"):
                reply = chat.send(turn.text, want=s.get("want", []))
            if recorded is None:
                table.add_row(str(turn.index), "no saved reply", "", "")
                identical = False
                continue
            text_same = reply.trace == (recorded.token_trace or recorded.text)
            old, new = list(recorded.media_out), list(reply.media)
            diffs = []
            if not text_same:
                ratio = difflib.SequenceMatcher(None, recorded.text, reply.text).ratio()
                diffs.append(f"text similarity {ratio:.2f}")
            if len(old) != len(new):
                diffs.append(f"{len(old)} media saved, {len(new)} now")
            media_same = len(old) == len(new)
            for o, n in zip(old, new):
                if o.sha256 != n.sha256:
                    media_same = False
                    diffs.append(f"{o.modality}: " + _media_difference(o.path, n.path, o.modality))
            identical &= text_same and media_same
            table.add_row(
                str(turn.index),
                "identical" if text_same else "[red]differs[/]",
                ("identical" if media_same else "[red]differs[/]") + f" ({len(new)})",
                "; ".join(diffs),
            )
        scratch.close()
    console.print(table)
    console.print("every turn identical" if identical else "[red]some turns differ[/]")
    return 0 if identical else 1
