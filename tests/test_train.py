"""Training on the tiny profile (CPU): the three stages overfit a handful of examples, only the
intended parameters move, checkpoints load back, resume continues, export round-trips, and a
2-process accelerate run keeps the processes in sync."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nextgpt.checkpoint import load_checkpoint
from nextgpt.model import NextGPT
from training.trainer import TargetCache, TrainConfig, Trainer, load_stage_data
from training.trainer.rows import N_NEW
from training.world.dataset import write_pairs
from training.world.dialogs import write_dialogs

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("train-data")
    write_pairs(d, "image", 4, 0, side=32)
    write_pairs(d, "audio", 2, 0)
    write_dialogs(d / "dialogs", 4, 0, side=32, outputs=False)
    return d


@pytest.fixture()
def model(settings, cache_dir):
    return NextGPT.from_profile(settings.profile("tiny"), cache_dir)


def _first_last(losses, k=3):
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


def _cfg(out, **kw):
    base = dict(stage=1, output_dir=out, max_steps=10, batch_size=8, lr=2e-2, warmup_steps=1, progress=False, log_every=100)
    base.update(kw)
    return TrainConfig(**base)


def _cli(*args):
    from training.stages import main

    return main([*map(str, args), "--no-progress", "--log-every", "100"])


# ------------------------------------------------------------------------------------------ stage 1


@pytest.mark.slow
def test_stage1_trains_input_proj_and_only_the_new_rows(model, data, tmp_path, settings, cache_dir):
    llm = model.llm
    before = {n: p.detach().clone() for n, p in llm.named_parameters()}
    emb0 = llm.get_input_embeddings().weight.detach().clone()
    head0 = llm.get_output_embeddings().weight.detach().clone()
    proj0 = model.input_proj.weight.detach().clone()
    logs = []
    trainer = Trainer(model, _cfg(tmp_path / "s1"), log=logs.append)
    share = [m for m in logs if m.startswith("trainable parameters:")]
    assert share and "%" in share[0]
    trainable, total = trainer.trainable, trainer.total
    assert 0 < trainable < total and trainable == 2 * N_NEW * 64 + model.input_proj.weight.numel() + 64

    result = trainer.fit(load_stage_data(1, [data / "image_pairs.json", data / "audio_pairs.json"]))
    assert result.step == 10 and len(result.losses) == 10
    first, last = _first_last(result.losses)
    assert last < first - 0.02, result.losses
    assert not torch.equal(model.input_proj.weight, proj0)
    rows = trainer.rows.state_dict()
    for name, p in llm.named_parameters():  # the frozen LLM: not one bit moved (wrappers hold the rows)
        key = name.replace(".base.", ".")
        if key in before:
            assert torch.equal(p, before[key]), name

    trainer.finalize()  # rows merged into the matrices: base rows bit-identical, new rows trained
    emb, head = model.llm.get_input_embeddings().weight, model.llm.get_output_embeddings().weight
    assert torch.equal(emb[:-N_NEW], emb0[:-N_NEW]) and torch.equal(head[:-N_NEW], head0[:-N_NEW])
    assert not torch.equal(emb[-N_NEW:], emb0[-N_NEW:]) and not torch.equal(head[-N_NEW:], head0[-N_NEW:])
    assert torch.equal(emb[-N_NEW:], rows["embed_tokens.new_rows"])
    from nextgpt.model import MediaInput, Message

    image = data / "images" / "000000.png"
    reply = model.generate([Message("user", "generate a caption", [MediaInput("image", path=image)])], max_new_tokens=3, seed=0)
    assert len(reply.token_ids) >= 1  # the finalized model is an ordinary NextGPT again

    # the output dir is a checkpoint that `profile.checkpoint` loads
    ck = load_checkpoint(tmp_path / "s1")
    assert set(ck.tensors) >= {"input_proj.weight", "embed_tokens.new_rows", "lm_head.new_rows"} and ck.adapter_dir is None
    assert json.loads((tmp_path / "s1" / "meta.json").read_text())["format"] == "nextgpt-checkpoint/1"
    profile = settings.profile("tiny").model_copy(update={"checkpoint": str(tmp_path / "s1")})
    loaded = NextGPT.from_profile(profile, cache_dir)
    assert torch.equal(loaded.input_proj.weight, model.input_proj.weight)
    assert torch.equal(loaded.input_proj.bias, model.input_proj.bias)
    lemb = loaded.llm.get_input_embeddings().weight
    assert torch.equal(lemb[:-N_NEW], emb0[:-N_NEW]) and torch.equal(lemb[-N_NEW:], emb[-N_NEW:])
    assert torch.equal(loaded.llm.get_output_embeddings().weight, head)
    metrics = [json.loads(x) for x in (tmp_path / "s1" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 11))


@pytest.mark.slow
def test_resume_continues_from_the_saved_step(settings, cache_dir, data, tmp_path):
    dialogs = load_stage_data(1, [data / "image_pairs.json", data / "audio_pairs.json"])

    def run(out, **kw):
        m = NextGPT.from_profile(settings.profile("tiny"), cache_dir)
        t = Trainer(m, _cfg(out, max_steps=4, batch_size=2, save_every=2, **kw), log=lambda s: None)
        return t, t.fit(dialogs)

    _, full = run(tmp_path / "full")
    assert (tmp_path / "full" / "checkpoints" / "step-000002" / "trainer_state").is_dir()
    # a run that stopped after step 2 (its state is copied), then resumed to step 4
    import shutil

    (tmp_path / "part" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-000002", tmp_path / "part" / "checkpoints" / "step-000002")
    t, resumed = run(tmp_path / "part", resume="latest")
    assert resumed.step == 4 and [m["step"] for m in resumed.metrics] == [3, 4]
    assert resumed.losses == pytest.approx(full.losses[2:], rel=1e-5)
    a, b = load_file(str(tmp_path / "full" / "nextgpt.safetensors")), load_file(str(tmp_path / "part" / "nextgpt.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(Exception, match="--resume"):  # a second run into the same folder must say so
        run(tmp_path / "full")


# ------------------------------------------------------------------------------------------ stages 2 and 3 (CLI)


@pytest.mark.slow
def test_stage2_cli_trains_the_output_projectors(data, tmp_path, capsys, settings):
    out = tmp_path / "s2"
    rc = _cli("--stage", 2, "--data", data / "image_pairs.json", "--data", data / "audio_pairs.json", "--output", out,
              "--init", "none", "--steps", 10, "--batch-size", 8, "--lr", 2e-2, "--warmup", 1,
              "--targets", tmp_path / "targets")  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "trainable parameters:" in text and "computing 6 decoder text embedding(s)" in text
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "l2_image", "l2_audio"):
        first, last = _first_last([m[key] for m in metrics])
        assert last < first, (key, metrics)
    assert json.loads((out / "meta.json").read_text())["trained"] == ["output_projectors", "new_rows"]
    # targets are cached: the decoders' own text embeddings, computed once
    cache = TargetCache({m: d for m in ("image", "audio") for d in (tmp_path / "targets").glob(f"{m}-*")})
    assert cache.count("image") == 4 and cache.count("audio") == 2
    caption = json.loads((data / "image_pairs.json").read_text())[0]["caption"]
    assert cache.get("image", caption).shape == (77, 32)  # the tiny SD text encoder's (L, D), stored as produced
    rc = _cli("--stage", 2, "--data", data / "audio_pairs.json", "--output", out, "--init", "none", "--steps", 1,
              "--targets", tmp_path / "targets", "--overwrite")  # fmt: skip
    assert rc == 0 and "computing" not in capsys.readouterr().out


@pytest.fixture(scope="module")
def stage3_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("s3") / "run"
    from training.stages import main

    rc = main(["--stage", "3", "--data", str(data / "dialogs" / "dialogs.json"), "--output", str(out), "--init", "none",
               "--steps", "10", "--batch-size", "8", "--lr", "2e-2", "--warmup", "1", "--lora-r", "4",
               "--lora-alpha", "4", "--no-progress", "--log-every", "100"])  # fmt: skip
    assert rc == 0
    return out


@pytest.mark.slow
def test_stage3_cli_lora_instruction_tuning(stage3_run, settings, cache_dir):
    metrics = [json.loads(x) for x in (stage3_run / "metrics.jsonl").read_text().splitlines()]
    first, last = _first_last([m["loss"] for m in metrics])
    assert last < first
    first, last = _first_last([m["lm"] for m in metrics])
    assert last < first
    meta = json.loads((stage3_run / "meta.json").read_text())
    assert meta["trained"] == ["input_proj", "output_projectors", "new_rows", "lora"] and meta["lora_rank"] == 4 and meta["lora_alpha"] == 4
    adapter = load_file(str(stage3_run / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(".lora_" in k and "self_attn" in k for k in adapter)
    assert json.loads((stage3_run / "adapter" / "adapter_config.json").read_text())["lora_dropout"] == 0.1
    # loads through the profile (LoRA merged) and generates
    profile = settings.profile("tiny").model_copy(update={"checkpoint": str(stage3_run)})
    loaded = NextGPT.from_profile(profile, cache_dir)
    trained = load_file(str(stage3_run / "nextgpt.safetensors"))
    assert torch.equal(loaded.input_proj.weight, trained["input_proj.weight"])
    from nextgpt.model import Message

    reply = loaded.generate([Message("user", "Draw a red circle.")], want=["image"], max_new_tokens=4, seed=0)
    assert [s.modality for s in reply.signals] == ["image"] and reply.signals[0].prompt_embeds.shape == (1, 8, 32)


@pytest.mark.slow
def test_export_official_round_trip(stage3_run, settings, cache_dir, tmp_path):
    from nextgpt.checkpoint import convert_official
    from nextgpt.llm import load_llm
    from training.trainer.export import export_official

    profile = settings.profile("tiny")
    base = load_llm(profile.llm, cache_dir, torch.device("cpu"), torch.float32)
    pt = export_official(stage3_run, tmp_path / "official", base.model, tokenizer=base.tokenizer,
                         projectors=profile.projectors, dtype=None)  # fmt: skip
    sd = torch.load(pt, weights_only=True)
    assert "llama_proj.weight" in sd and "gen_text_hidden_fcs_video.0.query_embs" in sd
    cfg = base.model.config
    back = convert_official(tmp_path / "official", tmp_path / "back", cfg, 32, profile.projectors)
    ours, again = load_checkpoint(stage3_run), load_checkpoint(back)
    for k, v in ours.tensors.items():
        if k.endswith(".new_rows"):
            full = again.tensors[k.replace("new_rows", "weight")]
            assert torch.equal(full[-N_NEW:], v)
            side = base.model.get_input_embeddings() if k.startswith("embed") else base.model.get_output_embeddings()
            assert torch.equal(full[:-N_NEW], side.weight[:-N_NEW])
        else:
            assert torch.equal(again.tensors[k], v), k
    a = load_file(str(ours.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(again.adapter_dir / "adapter_model.safetensors"))
    # official convention α = 32: lora_B carries our α/32 (= 1/8 here, exact), the merged weights are equal
    assert a.keys() == b.keys() and all(torch.equal(a[k] * (4 / 32 if "lora_B" in k else 1), b[k]) for k in a)
    # the CLI front end
    from training.stages import main

    assert main(["export", "--official", str(stage3_run), str(tmp_path / "cli"), "--dtype", "float16"]) == 0
    assert torch.load(tmp_path / "cli" / "pytorch_model.pt", weights_only=True)["llama_proj.weight"].dtype == torch.float16


@pytest.mark.slow
def test_training_from_a_converted_official_checkpoint(stage3_run, settings, cache_dir, data, tmp_path):
    """An official checkpoint moved EVERY embedding row and carries LoRA: continuing from it (stage 1, no LoRA)
    keeps both: the whole matrices are saved, the adapter is copied."""
    from safetensors.torch import save_file

    from nextgpt.checkpoint import convert_official
    from nextgpt.llm import load_llm
    from training.trainer.export import export_official

    profile = settings.profile("tiny")
    base = load_llm(profile.llm, cache_dir, torch.device("cpu"), torch.float32)
    export_official(stage3_run, tmp_path / "official", base.model, dtype=None)
    official = convert_official(tmp_path / "official", tmp_path / "conv", base.model.config, 32, profile.projectors)
    t = load_file(str(official / "nextgpt.safetensors"))
    t["embed_tokens.weight"][0] += 1.0  # a base row the official training moved
    save_file(t, str(official / "nextgpt.safetensors"))

    out = tmp_path / "from-official"
    assert _cli("--stage", 1, "--data", data / "image_pairs.json", "--output", out, "--init", official, "--steps", 2) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["init"] == str(official) and meta["new_rows"].startswith("whole matrices")
    saved = load_file(str(out / "nextgpt.safetensors"))
    assert torch.equal(saved["embed_tokens.weight"][:-N_NEW], t["embed_tokens.weight"][:-N_NEW])
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == (official / "adapter" / "adapter_model.safetensors").read_bytes()
    a = NextGPT.from_profile(profile.model_copy(update={"checkpoint": str(out)}), cache_dir)
    b = NextGPT.from_profile(profile.model_copy(update={"checkpoint": str(official)}), cache_dir)
    assert torch.equal(a.llm.get_input_embeddings().weight[:-N_NEW], b.llm.get_input_embeddings().weight[:-N_NEW])
    qa, qb = (m.llm.model.layers[0].self_attn.q_proj.weight for m in (a, b))
    assert torch.equal(qa, qb)  # the same LoRA merged


def test_cli_bad_data_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"caption": "a red circle", "image_name": "nope.png"}]))
    assert _cli("--stage", 1, "--data", bad, "--output", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "record 0" in err and "'image_name'" in err and "not found" in err


# ------------------------------------------------------------------------------------------ data-parallel


@pytest.mark.slow
def test_two_process_accelerate_run_stays_in_sync(data, tmp_path, cache_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    # `accelerate launch --cpu` starts one process unless given an MPI hostfile; --multi_gpu goes through torchrun,
    # and on a machine without CUDA the trainer picks the CPU (gloo) itself
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "training.stages", "--stage", "3", "--data", str(data / "dialogs" / "dialogs.json"), "--output", str(out),
           "--init", "none", "--steps", "6", "--batch-size", "2", "--lr", "2e-2", "--warmup", "1", "--lora-r", "4",
           "--lora-alpha", "4", "--save-every", "3", "--no-progress", "--dump-rank-state"]  # fmt: skip
    env["CUDA_VISIBLE_DEVICES"] = ""  # this test is about CPU data-parallel (gloo), even on a GPU machine
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "× 2 process(es)" in proc.stdout and proc.stdout.count("trainable parameters:") == 1
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = _first_last([m["loss"] for m in metrics], 2)
    assert len(metrics) == 6 and last < first, metrics
    r0, r1 = load_file(str(out / "rank-0.safetensors")), load_file(str(out / "rank-1.safetensors"))
    assert any(k.startswith("adapter.") for k in r0)  # LoRA, projections, new rows: all the trainable tensors
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    assert torch.equal(r0["input_proj.weight"], load_file(str(out / "nextgpt.safetensors"))["input_proj.weight"])


def test_lm_loss_on_the_scored_positions_only_equals_the_full_logits_loss(model, data, tmp_path):
    """The trainer computes logits only where the next token is scored (`signal_forward(logits_at=)`):
    the same loss, and the same gradients, as the (B, T, vocab) logits with ignored positions."""
    import torch.nn.functional as F

    from training.trainer.encode import IGNORE, Collator, MediaCache

    trainer = Trainer(model, _cfg(tmp_path / "s3", stage=3, lora_r=4, lora_dropout=0.0), log=lambda _: None)
    examples = trainer.build_examples(load_stage_data(3, [data / "dialogs" / "dialogs.json"]))
    shapes = {m: (p.query_embs.shape[1], p.model.out_features) for m, p in model.output_projectors.items()}
    collate = Collator(model.tokenizer.pad_token_id or 0, model.input_proj.in_features, shapes, MediaCache(model.encoder.encode), None)
    batch = collate(examples[:3])
    labels = batch["labels"]
    assert (labels == IGNORE).any() and (labels != IGNORE).any()
    module = trainer.module

    def grads():
        return [p.grad.clone() for p in module.parameters() if p.requires_grad and p.grad is not None]

    module.zero_grad()
    lm = module(batch)["lm"]
    lm.backward()
    g_new = grads()
    module.zero_grad()
    logits = module.run(batch).logits[:, :-1].float()  # the old way: every position's logits
    full = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    full.backward()
    g_old = grads()
    assert torch.allclose(lm, full, rtol=1e-5, atol=1e-6), (float(lm), float(full))
    assert len(g_new) == len(g_old) > 0
    for a, b in zip(g_new, g_old):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_time_budget_cuts_the_step_count_and_the_lr_decay_follows(model, data, tmp_path, settings, cache_dir):
    """`max_minutes`: after CALIBRATE_STEPS timed steps the planned count is cut to what the budget
    holds (here nothing more: the budget is already spent), the LR decays to 0 at the new end, and
    trainer.json records the count the run was cut to; a budget that holds the plan changes nothing."""
    from training.trainer.trainer import CALIBRATE_STEPS

    dialogs = load_stage_data(1, [data / "image_pairs.json", data / "audio_pairs.json"])
    out = tmp_path / "cut"
    result = Trainer(model, _cfg(out, max_steps=500, batch_size=2, max_minutes=1e-4), log=lambda s: None).fit(dialogs)
    assert result.step == 1 + CALIBRATE_STEPS < 500
    assert result.metrics[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert json.loads((out / "trainer.json").read_text())["planned_steps"] == result.step
    # resumed, the run keeps the count it was cut to (no second budget, no LR back up to the old plan)
    again = Trainer(NextGPT.from_profile(settings.profile("tiny"), cache_dir),
                    _cfg(out, max_steps=500, batch_size=2, max_minutes=1e-4, resume="latest"), log=lambda s: None).fit(dialogs)  # fmt: skip
    assert again.step == result.step and again.metrics == []


def test_time_budget_that_holds_the_plan_changes_nothing(settings, cache_dir, data, tmp_path):
    dialogs = load_stage_data(1, [data / "image_pairs.json", data / "audio_pairs.json"])
    m = NextGPT.from_profile(settings.profile("tiny"), cache_dir)
    result = Trainer(m, _cfg(tmp_path / "whole", max_steps=14, batch_size=2, max_minutes=60), log=lambda s: None).fit(dialogs)
    assert result.step == 14 and json.loads((tmp_path / "whole" / "trainer.json").read_text())["planned_steps"] == 14


def test_a_later_stage_in_the_same_process_may_change_the_mixed_precision():
    """training.small runs stages 1-2 in fp32 and, with --bf16, stages 3-9 in bf16 in one process:
    accelerate keeps its state process-wide and would refuse the change."""
    from training.trainer.trainer import make_accelerator

    assert make_accelerator(mixed_precision="no", cpu=True).mixed_precision == "no"
    assert make_accelerator(mixed_precision="bf16", cpu=True).mixed_precision == "bf16"
    assert make_accelerator(mixed_precision="no", cpu=True).mixed_precision == "no"


def test_training_runs_the_llm_on_transformers_whatever_backend_the_profile_chats_on(settings, cache_dir):
    # a profile that chats on llama.cpp (small's `auto` on a CPU) still trains: training needs the
    # transformers modules and their gradients. Here a tiny profile set to llama_cpp would be refused
    # by that backend (its source is no GGUF), so loading at all shows the switch.
    from training.stages import load_model

    tiny = settings.profile("tiny")
    chatting = tiny.model_copy(update={"llm": tiny.llm.model_copy(update={"backend": "llama_cpp"})})
    model, adapter, _ = load_model(settings, chatting, None, print)
    assert isinstance(model.llm, torch.nn.Module) and adapter is None
    assert sum(p.numel() for p in model.llm.parameters()) > 0
