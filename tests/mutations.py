"""A rerunnable mutation check: each breakage below, applied alone to a copy of the repository, must
make at least one test fail. Not part of `make test` (it runs the chosen tests once per breakage).

    .venv/bin/python tests/mutations.py              # all breakages, after a baseline run
    .venv/bin/python tests/mutations.py --only clip,blob --no-baseline
    .venv/bin/python tests/mutations.py --list

Every breakage is an exact text replacement (`old` must occur exactly once, so a patch that no
longer applies is reported, not silently skipped) in a fresh copy of the working tree (tracked and
untracked, not ignored files), and runs only the tests named for it (pytest -x). The baseline run
first checks that those tests pass on the unchanged copy. Exit status 1 when a breakage survives.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DISCORD = "tests/test_discord.py"


@dataclass
class Mutation:
    name: str
    what: str
    path: str
    old: str
    new: str
    tests: list[str]  # pytest arguments (node ids, -k expressions)


MUTATIONS = [
    Mutation("clip", "the bot's 2000-character message clip removed", "bots/discord/bot.py",
             "MAX_CONTENT = 2000", "MAX_CONTENT = 10**6",
             [DISCORD, "-k", "longer_than_discord_allows"]),
    Mutation("reply-txt", "a long reply's text no longer clipped (nor attached)", "bots/discord/bot.py",
             "            if len(text) > room:\n", "            if False:\n",
             [DISCORD, "-k", "longer_than_discord_allows"]),
    Mutation("upload-budget", "reply.txt attached whatever the upload limit", "bots/discord/bot.py",
             "if len(data) <= responder.limit // (2 if media else 1):", "if True:",
             [DISCORD, "-k", "longer_than_discord_allows"]),
    Mutation("ack", "the interaction acknowledged only after the attachment's download", "bots/discord/bot.py",
             "await asyncio.wait({check}, timeout=max(0.0, min(ACK_BUDGET_S, 2.0 - max(0.0, age))))",
             "await asyncio.wait({check})",
             [DISCORD, "-k", "slow_attachment_download"]),
    Mutation("loop", "the Discord event loop blocked for a whole job", "bots/discord/bot.py",
             "        future = asyncio.wrap_future(job.future)\n",
             "        _wait_quietly(job)  # (blocks the event loop)\n        future = asyncio.wrap_future(job.future)\n",
             [DISCORD, "-k", "event_loop_is_free"]),
    Mutation("gguf", "the GGUF dequantised on every load", "nextgpt/llm.py",
             'if not (copy / "config.json").is_file():', "if True:",
             ["tests/test_llm.py", "-k", "gguf"]),
    Mutation("json-errors", "`errors` dropped from ask --json", "bots/cli.py",
             '            "errors": [f"{f.modality} decoder ({f.tool}) failed: {f.error}" for f in reply.failures],\n', "",
             ["tests/test_cli.py", "-k", "failing_decoder"]),
    Mutation("stderr-warning", "the decoder-failure warning on stderr dropped", "bots/cli.py",
             'print(f"warning: the {f.modality} decoder ({f.tool}) failed: {f.error}", file=sys.stderr)', "pass",
             ["tests/test_cli.py", "-k", "failing_decoder"]),
    Mutation("truncate-half", "context truncation down to 1/2 of the budget (README: 3/4)", "assistant/session.py",
             "TRUNCATE_TO = 0.75", "TRUNCATE_TO = 0.5", ["tests/test_context_budget.py"]),
    Mutation("truncate-0.9", "context truncation down to 0.9 of the budget (README: 3/4)", "assistant/session.py",
             "TRUNCATE_TO = 0.75", "TRUNCATE_TO = 0.9", ["tests/test_context_budget.py"]),
    Mutation("blob", "the in-transaction blob re-check skipped", "memory/store.py",
             'self._reput(m, p["sha256"])', "pass", ["tests/test_memory.py", "-k", "racing"]),
    Mutation("post-norm", "the output projector post-norm instead of pre-norm", "nextgpt/projectors.py",
             "norm_first=cfg.norm_first,", "norm_first=False,", ["tests/test_projector_reference.py"]),
    Mutation("seed", "media not reproducible from the seed", "tools/base.py",
             'generator = torch.Generator("cpu").manual_seed(seed)',
             'generator = torch.Generator("cpu").manual_seed(secrets.randbits(63))',
             ["tests/test_cli.py", "-k", "same_seed"]),
    Mutation("batch-rows", "a batched decoder call shares one generator across its rows", "tools/base.py",
             'generator = [torch.Generator("cpu").manual_seed(s) for s in seeds]',
             'generator = torch.Generator("cpu").manual_seed(seeds[0])',
             ["tests/test_discord_batch.py", "-k", "video_row"]),
    Mutation("eval-precision", "signal precision counts unasked media as right", "training/evaluate.py",
             "tp = sum(1 for c in with_media if c.asked)", "tp = len(with_media)",
             ["tests/test_evaluate.py", "-k", "scoring_and_summary or end_to_end"]),
    Mutation("regenerate-pins", "a regenerate keeps only the seed (steps and guidance follow the current settings)",
             "assistant/settings.py",
             'REGENERATE_PINS = ("seed", "steps", "guidance")', 'REGENERATE_PINS = ("seed",)',
             ["tests/test_turn_api.py", "-k", "none_means"]),
    Mutation("ci-skips", "a skip in CI no longer fails", "tests/conftest.py",
             'report.outcome = "failed"', "pass", ["tests/test_ci_skips.py"]),
]


def copy_tree(dst: Path) -> None:
    """The working tree as it is (tracked and untracked files, not the ignored ones)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def pytest(copy: Path, args: list[str], log: Path) -> tuple[int, str]:
    env = dict(os.environ)
    env.pop("CI", None)  # a skip is reported as such here (and counts as not caught)
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *args]
    r = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True)
    log.write_text(r.stdout + r.stderr)
    last = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
    return r.returncode, last


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated breakage names")
    ap.add_argument("--no-baseline", action="store_true", help="skip the run on the unchanged copy")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--logs", type=Path, default=Path(tempfile.gettempdir()) / "nextgpt-mutations")
    args = ap.parse_args(argv)
    chosen = MUTATIONS
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {m.name for m in MUTATIONS})
        if unknown:
            ap.error(f"unknown breakage(s) {unknown}; --list shows them")
        chosen = [m for m in MUTATIONS if m.name in names]
    if args.list:
        for m in chosen:
            print(f"{m.name:15} {m.path:22} {m.what}")
        return 0
    os.environ.setdefault("NEXTGPT_CACHE", str(Path(tempfile.gettempdir()) / "nextgpt-mutations-cache"))
    args.logs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="nextgpt-mutations-"))
    try:
        if not args.no_baseline:
            base = work / "baseline"
            copy_tree(base)
            failed = []
            for m in chosen:  # each selection on the unchanged code: it must pass, or a catch means nothing
                rc, last = pytest(base, m.tests, args.logs / f"baseline-{m.name}.log")
                if rc != 0 or "passed" not in last:
                    failed.append(f"{m.name}: {last}")
            if failed:
                print("baseline: the selected tests do not pass on the unchanged code:\n  " + "\n  ".join(failed))
                return 1
            print(f"baseline: every selection passes on the unchanged code ({len(chosen)} selections)")
        rows, survived = [], 0
        for m in chosen:
            copy = work / m.name
            copy_tree(copy)
            target = copy / m.path
            text = target.read_text()
            if text.count(m.old) != 1:
                rows.append((m, "PATCH DOES NOT APPLY", f"{text.count(m.old)} matches", 0.0))
                survived += 1
                continue
            target.write_text(text.replace(m.old, m.new))
            t0 = time.monotonic()
            rc, last = pytest(copy, m.tests, args.logs / f"{m.name}.log")
            caught = rc != 0 and "failed" in last
            survived += not caught
            rows.append((m, "caught" if caught else "SURVIVED", last, time.monotonic() - t0))
            shutil.rmtree(copy, ignore_errors=True)
        print(f"\n| breakage | file | result | tests ({' '.join(['pytest -x'])}) | s |\n|---|---|---|---|---|")
        for m, result, last, seconds in rows:
            print(f"| {m.name}: {m.what} | `{m.path}` | **{result}** ({last}) | `{' '.join(m.tests)}` | {seconds:.0f} |")
        print(f"\n{len(rows) - survived} of {len(rows)} breakages caught; logs in {args.logs}")
        return 1 if survived else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
