"""`nextgpt` command line. Imports stay lazy so that `nextgpt --help` never loads torch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MODALITY_CHOICES = ("image", "video", "audio")


class UserError(Exception):
    """A problem the user can fix; printed as one line, no traceback."""


def _settings(args):
    from nextgpt.config import ConfigError, load_settings

    try:
        settings = load_settings(args.config)
        settings.profile(args.profile)
    except ConfigError as e:
        raise UserError(str(e)) from None
    return settings


def _media_summary(m) -> dict:
    keys = ("modality", "path", "mime", "sha256", "width", "height", "frames", "fps", "duration", "sample_rate", "preview_path")
    out = {k: getattr(m, k, None) for k in keys}
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items() if v is not None}


def _describe(m) -> str:
    if m.modality == "image":
        return f"image: {m.path} ({m.width}x{m.height})"
    if m.modality == "video":
        return f"video: {m.path} ({m.frames} frames, {m.duration:.2f} s; preview {m.preview_path})"
    return f"audio: {m.path} ({m.duration:.2f} s)"


def _seed(text: str) -> int:
    from nextgpt.limits import parse_seed

    try:
        return parse_seed(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_ask(args) -> int:
    from nextgpt.limits import check_message, check_text

    try:  # an argv with invalid UTF-8 arrives with lone surrogates: refused before anything is saved
        check_text(args.prompt, "the prompt")
    except ValueError as e:
        raise UserError(str(e)) from None
    settings = _settings(args)
    from bots.quiet import quiet_logging

    # before torch (nextgpt.media) imports tqdm, which reads TQDM_DISABLE once
    quiet_logging(settings.data_path)  # stdout is the answer, stderr our own errors and warnings
    from nextgpt.limits import MAX_ATTACHMENTS

    if len(args.attach) > MAX_ATTACHMENTS:  # counted before any file is read
        raise UserError(f"too many attachments ({len(args.attach)}, limit max_attachments = {MAX_ATTACHMENTS})")
    attachments = []
    for f in args.attach:  # every attachment is checked before the model is loaded
        from nextgpt.media import AttachmentError, validate_attachment  # torch: only with attachments

        try:
            attachments.append((validate_attachment(f), Path(f)))
        except AttachmentError as e:
            raise UserError(str(e)) from None
    if not args.prompt.strip() and not attachments:
        raise UserError("empty prompt: say something or attach a file")
    if args.no_log and (args.continue_last or args.session):
        raise UserError("--no-log cannot be combined with --continue / --session (they add to a saved session)")
    if args.session:  # checked before the model loads
        _session_or_error(_memory(settings), args.session)
    from assistant.agent import Assistant

    assistant = Assistant(settings, args.profile, output_dir=args.out)
    from bots.render import printable

    stream = not args.json and not args.no_stream
    on_text = (lambda t: (sys.stdout.write(printable(t)), sys.stdout.flush())) if stream else None
    try:  # before a session is made: a refused message leaves nothing behind
        check_message(assistant.model.tokenizer, args.prompt, len(attachments),
                      max_new_tokens=assistant.profile.generation.max_new_tokens)  # fmt: skip
    except ValueError as e:  # over a budget (prompt tokens, attachments)
        raise UserError(str(e)) from None
    if args.no_log:
        from nextgpt.messages import MediaInput, Message

        message = Message("user", args.prompt, [MediaInput(m, path=p) for m, p in attachments])
        reply = assistant.respond([message], want=args.want, seed=args.seed, on_text=on_text)
        session_id = None
    else:
        from assistant.session import Chat

        chat = Chat.start(assistant, _memory(settings), session_id=args.session, continue_last=args.continue_last)
        chat.settings.seed = args.seed
        chat.staged = attachments
        reply = chat.send(args.prompt, want=args.want, on_text=on_text)
        session_id = chat.session.id
    if args.json:
        print(json.dumps({
            "text": reply.text,
            "media": [_media_summary(m) for m in reply.media],
            "errors": [f"{f.modality} decoder ({f.tool}) failed: {f.error}" for f in reply.failures],
            "finish_reason": reply.finish_reason,
            "seed": reply.seed,
            "profile": assistant.profile_name,
            "session": session_id,
        }, ensure_ascii=False))
    else:
        if not stream:
            print(printable(reply.text), end="")
        print()
        for m in reply.media:
            print(_describe(m))
        for f in reply.failures:
            print(f"warning: the {f.modality} decoder ({f.tool}) failed: {f.error}", file=sys.stderr)
    return 0


def _memory(settings):
    from memory import Memory

    return Memory.open(data_dir=settings.data_path)


def _session_id(value: str) -> str:
    """argparse type of a session id argument: an empty one (an unset shell variable, say) is an error,
    not "no session"."""
    if not value.strip():
        raise argparse.ArgumentTypeError("empty session id (`nextgpt sessions` lists them)")
    return value.strip()


def _session_or_error(memory, session_id: str):
    from memory import SessionNotFound

    try:
        return memory.get_session(session_id)
    except SessionNotFound as e:
        raise UserError(str(e)) from None


def cmd_chat(args) -> int:
    from bots.chat import run

    settings = _settings(args)
    return run(settings, profile=args.profile, session_id=args.session, continue_last=args.continue_last, stream=not args.no_stream)


def cmd_sessions(args) -> int:
    settings = _settings(args)
    sessions = _memory(settings).list_sessions(args.limit)
    if args.json:
        print(json.dumps([s.to_dict() for s in sessions]))
        return 0
    if not sessions:
        print("no sessions yet — start one with: nextgpt chat")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "title", "turns", "profile", "last used")
    for s in sessions:
        table.add_row(s.id, s.title or "", str(s.turn_count), s.profile, s.updated_at.astimezone().strftime("%Y-%m-%d %H:%M"))
    Console().print(table)
    return 0


def cmd_discord(args) -> int:
    from bots.discord import run

    return run(_settings(args), profile=args.profile)


def cmd_serve(args) -> int:
    from bots.serve import run

    return run(_settings(args), profile=args.profile, host=args.host, port=args.port)


def _training(command: str):
    """The training wing's function for `command` (train, eval, export-official), found through the
    `nextgpt.training` entry-point group: the runtime never imports `training/` itself."""
    from importlib.metadata import entry_points

    found = entry_points(group="nextgpt.training", name=command)
    if not found:
        raise UserError(f"`{command}` comes from the training wing (training/), which is not installed here: "
                        "run `make setup` (or `pip install -e .`) in the repository")  # fmt: skip
    return next(iter(found)).load()


def _rest(args) -> list[str]:  # `train world` / `eval world` take no --config
    return list(args.rest) + (["--config", args.config] if args.config and args.rest[:1] != ["world"] else [])


def cmd_train(args) -> int:  # `nextgpt train ...` / `nextgpt train world ...` (training/cli.py)
    return _training("train")(_rest(args))


def cmd_eval(args) -> int:  # `nextgpt eval ...` / `nextgpt eval world ...` (training/cli.py)
    return _training("eval")(_rest(args))


def cmd_export(args) -> int:
    if args.official:
        extra = ["--profile", args.profile] if args.profile else []
        extra += ["--config", args.config] if args.config else []
        extra += ["--dtype", args.dtype] if args.dtype else []
        extra += ["--overwrite"] if args.overwrite else []
        return _training("export-official")(["--official", *args.official, *extra])
    if not args.session:
        raise UserError("export needs a session id (or --official SRC DST for a trained checkpoint)")
    from bots.export import export_session

    settings = _settings(args)
    memory = _memory(settings)
    session = _session_or_error(memory, args.session)
    try:
        out = export_session(memory, session.id, args.format, args.output)
    except OSError as e:  # unwritable place, a file where a folder should be, disk full
        raise UserError(f"cannot write the export: {e.strerror or e}{f' ({e.filename})' if e.filename else ''}") from None
    print(f"wrote {out}")
    return 0


def cmd_delete(args) -> int:
    settings = _settings(args)
    memory = _memory(settings)
    session = _session_or_error(memory, args.session)
    memory.delete_session(session.id)
    print(f"deleted session {session.id} ({session.turn_count} turns) and the media no other session uses")
    return 0


def cmd_replay(args) -> int:
    from bots.replay import replay, rerun

    settings = _settings(args)
    memory = _memory(settings)
    session = _session_or_error(memory, args.session)
    if args.rerun:
        try:
            return rerun(settings, memory, session.id, profile=args.profile)
        except ValueError as e:  # an input blob gone, a message over a budget
            raise UserError(str(e)) from None
    return replay(memory, session.id)


def cmd_repair(settings) -> int:
    from bots.repair import repair

    r = repair(_memory(settings), settings.output_path, settings.cache_path)
    print(f"removed {r.media_rows} unreferenced media rows, {r.blob_files} unreferenced blob files, "
          f"{len(r.orphan_outputs)} orphan output files, {len(r.temp_files)} temp files/folders")  # fmt: skip
    for sid, shas in r.damaged.items():
        print(f"session {sid}: {len(shas)} media file(s) missing from the blob store ({', '.join(s[:12] for s in shas[:3])})")
    if r.damaged:
        print(f"{len(r.damaged)} damaged session(s): their turns with those media cannot be re-run or continued until the files are back")
    return 1 if r.damaged else 0


def cmd_doctor(args) -> int:
    settings = _settings(args)
    if args.repair:
        return cmd_repair(settings)
    name = settings.profile_name(args.profile)
    profile = settings.profile(name)
    import torch

    from nextgpt.devices import resolve_device
    from nextgpt.doctor import component_status

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    print(f"torch {torch.__version__}; CUDA GPU: {gpu}; MPS: {'yes' if mps else 'no'}; 'auto' means {resolve_device('auto')}")
    print(f"profile: {name} — {profile.description}")
    print(f"cache dir: {settings.cache_path}    data dir: {settings.data_path}")
    problems = 0
    for component, device, status, ok in component_status(profile, settings.cache_path):
        problems += not ok
        print(f"  {'ok ' if ok else 'MISSING'} {component:<16} {device:<6} {status}")
    return 1 if problems else 0


CONVERT_PROFILE = "nextgpt-7b"  # the only released weights are the 7B stack's


def cmd_convert(args) -> int:
    settings = _settings(args)
    from nextgpt.checkpoint import CheckpointError
    from nextgpt.config import ConfigError
    from nextgpt.doctor import check_official, convert_for_profile

    try:
        if args.check:  # only reads: what the file holds and which profiles it fits
            if args.dst is not None:
                raise UserError("--check only reads: give SRC alone")
            lines, fits = check_official(settings, Path(args.src))
            print("\n".join(lines))
            return 0 if fits else 1
        if args.dst is None:
            raise UserError("give the output folder DST (or --check to only inspect SRC)")
        name = settings.profile_name(args.profile or CONVERT_PROFILE)
        out = convert_for_profile(settings, name, Path(args.src), Path(args.dst), overwrite=args.overwrite)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextgpt", description="Any-to-any multimodal assistant (NExT-GPT).")
    parser.add_argument("--config", help="config.yaml to use (default: ./config.yaml, then the bundled one)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help, profile_help="profile from config.yaml (default: its default_profile)"):
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--profile", "-p", help=profile_help)
        p.set_defaults(func=func)
        return p

    ask = add("ask", cmd_ask, "one-shot question; prints the reply and the paths of the media it made")
    ask.add_argument("prompt", help="what to ask")
    ask.add_argument("-a", "--attach", action="append", default=[], metavar="FILE", help="image/audio/video file (repeatable)")
    ask.add_argument("--want", action="append", default=[], choices=MODALITY_CHOICES, help="force this modality in the reply (repeatable)")
    ask.add_argument("--seed", type=_seed, help="seed for text sampling and media (same seed → identical files)")
    ask.add_argument("--out", type=Path, help="folder for generated media (default: the data dir's outputs/)")
    ask.add_argument("--json", action="store_true", help='print one JSON object {"text", "media": [...]}')
    ask.add_argument("--no-stream", action="store_true", help="print the text when it is complete")

    ask.add_argument("--no-log", action="store_true", help="don't save this exchange in memory")
    ask.add_argument("-c", "--continue", dest="continue_last", action="store_true",
                     help="continue the last session: the earlier turns are the context (\"now make it blue\")")
    ask.add_argument("--session", metavar="ID", type=_session_id, help="continue this session (id or unique prefix)")

    chat = add("chat", cmd_chat, "interactive chat with memory (/help inside lists commands)")
    chat.add_argument("-c", "--continue", dest="continue_last", action="store_true", help="continue the last session")
    chat.add_argument("--session", "-s", type=_session_id, help="resume this session (id or unique prefix)")
    chat.add_argument("--no-stream", action="store_true", help="print replies when complete")

    sessions = add("sessions", cmd_sessions, "list saved sessions (id, title, turns, last used)")
    sessions.add_argument("-n", "--limit", type=int, help="at most this many, newest first")
    sessions.add_argument("--json", action="store_true", help="print JSON")

    replay = add("replay", cmd_replay, "show a saved session with its media; --rerun re-executes it and compares")
    replay.add_argument("session", type=_session_id, help="session id (or unique prefix)")
    replay.add_argument("--rerun", action="store_true", help="re-run the user turns with the recorded seeds and settings")

    export = add("export", cmd_export, "export a session as Markdown, self-contained HTML, or JSON")
    export.add_argument("session", nargs="?", type=_session_id, help="session id (or unique prefix)")
    export.add_argument("--format", "-f", choices=("md", "html", "json"), default="md")
    export.add_argument("--output", "-o", type=Path, help="file to write (default: session-ID.FORMAT here)")
    export.add_argument("--official", nargs=2, metavar=("SRC", "DST"), help="write a trained checkpoint SRC as the official pytorch_model.pt DST")
    export.add_argument("--dtype", choices=("float16", "bfloat16", "float32", "keep"), help="with --official (default float16)")
    export.add_argument("--overwrite", action="store_true", help="with --official: replace DST")

    add("discord", cmd_discord, "serve the assistant as a Discord bot (token from $NEXTGPT_DISCORD_TOKEN)")
    serve = add("serve", cmd_serve, "an OpenAI-compatible HTTP API (keys from $NEXTGPT_API_KEYS; none needed on loopback)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs API keys)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    train = sub.add_parser("train", add_help=False,
                           help="train NExT-GPT: --stage 1|2|3 (`nextgpt train --help`); `train world`: the shapes-world "
                           "encoder and decoders (`nextgpt train world --help`)")  # fmt: skip
    train.set_defaults(func=cmd_train)
    evaluate = sub.add_parser("eval", add_help=False,
                              help="score a profile per direction (`nextgpt eval --help`); `eval world`: the shapes-world "
                              "encoder and decoders (`nextgpt eval world --help`)")  # fmt: skip
    evaluate.set_defaults(func=cmd_eval)

    delete = add("delete", cmd_delete, "delete a session and the media no other session uses")
    delete.add_argument("session", type=_session_id, help="session id (or unique prefix)")

    doctor = add("doctor", cmd_doctor, "show the device, the profile and which weights are present or missing")
    doctor.add_argument("--repair", action="store_true",
                        help="remove orphan outputs, unreferenced blobs and stale temp folders; list sessions with missing media")  # fmt: skip

    convert = add("convert", cmd_convert, "convert the released NExT-GPT pytorch_model.pt into a nextgpt checkpoint",
                  profile_help=f"the profile whose LLM, encoder and projector sizes the file must have "
                               f"(default: {CONVERT_PROFILE}, the released weights' stack)")  # fmt: skip
    convert.add_argument("src", help="pytorch_model.pt (or the folder holding it)")
    convert.add_argument("dst", nargs="?", help="output folder (set it as the profile's `checkpoint`)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    convert.add_argument("--check", action="store_true",
                         help="only read SRC and report its keys, shapes, dtype, LoRA rank and which profiles it fits")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "command", None) in ("train", "eval"):  # everything after them belongs to their own parsers
        args.rest = extra
    elif extra:
        parser.error("unrecognized arguments: " + " ".join(extra))
    try:
        return args.func(args)
    except UserError as e:
        print(f"nextgpt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # `python -m bots.cli`: run the imported module, so that the UserError the
    from bots.cli import main as _main  # training wing raises (bots.cli.UserError) is the one caught

    sys.exit(_main())
