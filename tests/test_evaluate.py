"""training.evaluate and training.small end to end on the tiny profile (the numbers are noise; the
harness, the scoring and the files are what is tested)."""

import json
from pathlib import Path

import pytest


def test_build_cases_deterministic_and_fresh(tmp_path):
    from training.evaluate import DIRECTIONS, PLAIN, build_cases

    a = build_cases(3, 12345, tmp_path / "a")
    b = build_cases(3, 12345, tmp_path / "b")
    assert [(c.direction, c.prompt, c.truth) for c in a] == [(c.direction, c.prompt, c.truth) for c in b]
    assert {c.direction for c in a} == set(DIRECTIONS) | {"plain"}
    assert sum(c.direction == "plain" for c in a) == len(PLAIN)
    assert all(c.asked == c.direction.split("→")[1] for c in a if c.direction.startswith("text→"))
    assert all(c.attach and c.attach[1].is_file() for c in a if c.direction.endswith("→text"))
    # another seed, other specs
    c = build_cases(3, 999, tmp_path / "c")
    assert [x.truth for x in a] != [x.truth for x in c]


def test_scoring_and_summary(tmp_path):
    from training.evaluate import Case, _score_case, summarize
    from training.world.dataset import write_media
    from training.world.spec import ImageSpec

    truth = ImageSpec("triangle", "green", "large", "left")
    png = tmp_path / "x.png"
    write_media(truth, png)
    t2i = Case("text→image", "draw a large green triangle", truth.attributes(), "image")
    _score_case(t2i, "Here it is.", {"image": [png]}, [])
    i2t = Case("image→text", "what is this?", truth.attributes(), None, ("image", png))
    _score_case(i2t, "I see a large green triangle on the left.", {}, [])
    wrong = Case("image→text", "what is this?", truth.attributes(), None, ("image", png))
    _score_case(wrong, "A red triangle.", {"image": []}, [])  # wrong colour, and unasked media
    missing = Case("text→image", "draw a green triangle", truth.attributes(), "image")
    _score_case(missing, "Sorry.", {}, [])
    plain = Case("plain", "hello", {}, None)
    _score_case(plain, "Hello!", {}, [])
    assert t2i.result["ok"] and i2t.result["ok"] and not wrong.result["ok"] and not missing.result["ok"]
    s = summarize([t2i, i2t, wrong, missing, plain])
    assert s["directions"]["text→image"]["accuracy"] == 0.5
    assert s["directions"]["image→text"]["accuracy"] == 0.5
    assert s["signals"]["precision"] == 0.5  # 2 replies with media, one of them asked
    assert s["signals"]["recall"] == 0.5


def test_evaluate_tiny_end_to_end(settings, tiny_assistant, tmp_path, capsys):
    from training.evaluate import DIRECTIONS, evaluate, format_markdown, print_table

    result = evaluate(settings, "tiny", n_per_direction=2, seed=7, out_dir=tmp_path, plain=2,
                      max_new_tokens=8, progress=False, assistant=tiny_assistant)  # fmt: skip
    assert set(result["directions"]) == set(DIRECTIONS)
    lines = (tmp_path / "cases.jsonl").read_text().splitlines()
    assert len(lines) == 6 * 2 + 2
    cases = [json.loads(x) for x in lines]
    assert all(isinstance(c["text"], str) for c in cases)
    assert_summary_matches_cases(result, cases, n=2)
    json.dumps(result)  # JSON-able
    print_table(result)
    assert "signal precision" in capsys.readouterr().out
    assert "| text→image |" in format_markdown(result)


def assert_summary_matches_cases(result, cases, *, n):
    """The table's numbers are the per-case outcomes counted: accuracy per direction, signal
    precision (replies with media that were asked for one) and recall (asked modality delivered)."""
    from training.evaluate import DIRECTIONS

    for d in DIRECTIONS:
        mine = [c for c in cases if c["direction"] == d]
        r = result["directions"][d]
        assert r["n"] == len(mine) == n
        assert r["accuracy"] == sum(bool(c["ok"]) for c in mine) / n, (d, r, [c["ok"] for c in mine])
        assert r["media_rate"] == sum(bool(c.get("media")) for c in mine) / n
    for c in cases:
        c["media"] = c.get("media") or []
    asked = [c for c in cases if c["asked"]]
    with_media = [c for c in cases if c["media"]]
    s = result["signals"]
    assert s["asked"] == len(asked) == 3 * n and s["replies_with_media"] == len(with_media)
    assert s["recall"] == sum(c["asked"] in c["media"] for c in asked) / len(asked)
    assert s["precision"] == (sum(bool(c["asked"]) for c in with_media) / len(with_media) if with_media else 1.0)
    # a text→X case is right only if an X was made
    assert not [c for c in cases if c["direction"].startswith("text→") and c["ok"] and c["asked"] not in c["media"]]


def test_evaluate_cli_json(monkeypatch, capsys, tmp_path, tiny_model):
    import assistant.agent as agent
    from training.evaluate import main

    monkeypatch.setattr(agent.Assistant, "model", property(lambda self: tiny_model))  # the session's tiny model
    rc = main(["--profile", "tiny", "--n", "1", "--plain", "1", "--max-new-tokens", "4", "--json", "--out", str(tmp_path)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["profile"] == "tiny" and out["n_per_direction"] == 1
    cases = [json.loads(x) for x in (tmp_path / "cases.jsonl").read_text().splitlines()]
    assert len(cases) == 6 + 1 and [c["direction"] for c in cases].count("plain") == 1
    assert_summary_matches_cases(out, cases, n=1)


def test_evaluate_cli_sampling_override(monkeypatch, capsys, tmp_path, tiny_model):
    """--temperature / --top-p replace the profile's sampling for the run (0 = greedy); bad values are refused."""
    import assistant.agent as agent
    from training.evaluate import main

    monkeypatch.setattr(agent.Assistant, "model", property(lambda self: tiny_model))
    args = ["--profile", "tiny", "--n", "1", "--plain", "0", "--max-new-tokens", "3", "--json"]
    assert main(args + ["--temperature", "0", "--top-p", "0.5", "--out", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["sampling"] == {"temperature": 0.0, "top_p": 0.5, "top_k": 0}
    for bad in (["--temperature", "-1"], ["--top-p", "0"], ["--top-p", "1.5"]):
        assert main(args + bad) == 2
        assert "--temperature must be >= 0 and --top-p in (0, 1]" in capsys.readouterr().err


@pytest.mark.slow
def test_train_small_smoke(tmp_path, monkeypatch):
    """The whole recipe at toy size: data, stages 1-9, refit, publish + model card; then a re-run skips everything."""
    from training.small import main
    from nextgpt.checkpoint import load_checkpoint

    work, out = tmp_path / "work", tmp_path / "ckpt"
    args = ["--smoke", "--profile", "tiny", "--work", str(work), "--out", str(out), "--no-progress"]
    assert main(args) == 0
    state = json.loads((work / "state.json").read_text())
    assert set(state["stages"]) == {"1", "2", "3", "4", "5", "6", "7", "8", "9"}
    assert all(s["reached"] == 2 for s in state["stages"].values())
    ck = load_checkpoint(out)
    assert ck.adapter_dir is not None and ck.meta["stage"] == 3
    assert ck.meta["refit"]["plan"]["steps"] == 3 and set(ck.meta["refit"]["report"]) == {"image", "video", "audio"}
    assert ck.meta["refit"]["examples"]["varied"] > 0  # the dialogs with varied request wordings are used
    assert ck.meta["refit"]["examples"]["conversations"] > 0  # and the multi-turn conversations
    assert ck.meta["refit"]["examples"]["emphasis"] > 0  # and stage 5's (several outputs in one reply)
    assert ck.meta["refit"]["examples"]["fresh"] > 0  # and stage 7's (references to earlier outputs weighted)
    assert ck.meta["refit"]["examples"]["fresh2"] > 0  # and stage 8's
    assert ck.meta["refit"]["examples"]["fresh3"] > 0  # and stage 9's
    assert ck.meta["init"].endswith("stage8")  # stage 9 continues stage 8, which continues 7, 6, 5, 4 and 3
    cached = sorted((work / "refit-states").glob("*.safetensors"))
    assert [f.name.split("-")[0] for f in cached] == ["conversations", "dialogs", "emphasis", "fresh", "fresh2", "fresh3", "pairs", "varied"]
    assert (work / "data" / "conversations-multi" / "dialogs.json").is_file()  # stage 5's data
    assert (work / "data" / "conversations-fresh" / "dialogs.json").is_file()  # stage 7's
    assert (work / "data" / "conversations-fresh2" / "dialogs.json").is_file()  # stage 8's
    assert (work / "data" / "conversations-fresh3" / "dialogs.json").is_file()  # stage 9's
    # every stage's input files were encoded once into the work folder's store (one folder per encoder)
    stores = [d for d in (work / "features").iterdir() if d.is_dir()]
    assert len(stores) == 1 and {p.parent.name for p in stores[0].glob("*/*.safetensors")} == {"image", "video", "audio"}
    card = (out / "README.md").read_text()
    assert "| 3 | instruction tuning" in card and "| 4 | conversation tuning" in card and "| 6 | conversations again" in card and "| 7 | fresh conversations" in card and "| 8 | fresh conversations again" in card and "| 9 | many fresh conversations" in card
    assert card.count("| CPU |") == 9  # where each stage ran (`--gpu` would say GPU)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert size < 5_000_000
    # everything complete: a second run only republishes
    mtime = (work / "stage9" / "nextgpt.safetensors").stat().st_mtime
    assert main(args) == 0
    assert (work / "stage9" / "nextgpt.safetensors").stat().st_mtime == mtime
    # another refit plan refits from the cached signal states (not recomputed) and republishes
    stamps = {f: f.stat().st_mtime_ns for f in cached}
    assert main(args + ["--refit", ",,5"]) == 0
    assert load_checkpoint(out).meta["refit"]["plan"]["steps"] == 5
    assert {f: f.stat().st_mtime_ns for f in sorted((work / "refit-states").glob("*.safetensors"))} == stamps
    # a finished stage selected alone needs nothing before it (a work folder holding only the weights to refit)
    import shutil

    shutil.rmtree(work / "stage8")
    assert main(args + ["--stages", "9", "--refit", ",,4"]) == 0
    assert load_checkpoint(out).meta["refit"]["plan"]["steps"] == 4
    assert load_checkpoint(out).meta["refit"]["isolated"] is False  # the default: the whole reply's states
    # --isolated-refit with a profile that isolates its groups: refitted on the isolated states (cached apart)
    import yaml

    cfg = yaml.safe_load((Path(__file__).resolve().parent.parent / "config.yaml").read_text())
    cfg["profiles"]["tiny"].setdefault("generation", {})["isolate_groups"] = True
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(args + ["--stages", "9", "--refit", ",,4", "--config", str(tmp_path / "config.yaml"), "--isolated-refit"]) == 0
    assert load_checkpoint(out).meta["refit"]["isolated"] is True
    assert "fitted on the states generate reads" in (out / "README.md").read_text()
    assert len(list((work / "refit-states").glob("*.safetensors"))) > len(cached)
    # a profile that reads every output restated (small's restated_all): refitted on the restated states
    # by default (cached apart again), on the conversations' own with --contextual-refit
    cfg["profiles"]["tiny"]["generation"]["isolate_groups"] = "restated_all"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    before = len(list((work / "refit-states").glob("*.safetensors")))
    assert main(args + ["--stages", "9", "--refit", ",,4", "--config", str(tmp_path / "config.yaml")]) == 0
    meta = load_checkpoint(out).meta["refit"]
    assert meta["restated"] is True and meta["isolated"] is False
    assert "re-read as a one-turn request" in (out / "README.md").read_text()
    assert len(list((work / "refit-states").glob("*.safetensors"))) > before
    assert main(args + ["--stages", "9", "--refit", ",,4", "--config", str(tmp_path / "config.yaml"), "--contextual-refit"]) == 0
    assert load_checkpoint(out).meta["refit"]["restated"] is False


@pytest.mark.slow
def test_train_small_published_checkpoint_loads(tmp_path, settings):
    """The float16 files that publish() writes load into the profile's float32 model and generate."""
    from training.small import main
    from nextgpt.model import Message, NextGPT

    work, out = tmp_path / "work", tmp_path / "ckpt"
    assert main(["--smoke", "--profile", "tiny", "--work", str(work), "--out", str(out), "--no-progress", "--steps", "1,1,1,1,1"]) == 0
    profile = settings.profile("tiny").model_copy(update={"checkpoint": str(out)})
    model = NextGPT.from_profile(profile, settings.cache_path)
    reply = model.generate([Message("user", "hello")], want=["image"], max_new_tokens=4, seed=0)
    assert [s.modality for s in reply.signals] == ["image"]


def test_fold_standardisation_keeps_the_projector_function():
    """The refit trains on standardised states and folds the scaling into the first Linear: the saved
    projector must give the same output on the raw states."""
    import torch

    from training.small import fold_standardisation

    torch.manual_seed(0)
    fc = torch.nn.Linear(6, 3)
    x = torch.randn(5, 4, 6) * torch.tensor([1.0, 50.0, 0.1, 3.0, 1.0, 200.0]) + 7.0
    mu, sd = x.mean((0, 1)), x.std((0, 1)) + 1e-5
    with torch.no_grad():
        want = fc((x - mu) / sd)
        fold_standardisation(fc, mu, sd)
        got = fc(x)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert not torch.allclose(fc.weight, torch.nn.Linear(6, 3).weight)


def test_dialog_eval_keeps_the_replies_that_hit_the_token_limit(settings, tiny_assistant, tmp_path):
    """`length_finishes` counts every generated turn that ran to max_new_tokens, and each such case keeps
    those replies' text (to tell a loop the guard missed from a long answer)."""
    from training.evaluate import evaluate_dialogs

    result = evaluate_dialogs(settings, "tiny", n=1, seed=7, out_dir=tmp_path, max_new_tokens=3, progress=False,
                              assistant=tiny_assistant)  # fmt: skip
    cases = [json.loads(x) for x in (tmp_path / "dialog-cases.jsonl").read_text().splitlines()]
    kept = [t for c in cases for t in c.get("length_turns", [])]
    assert result["length_finishes"] == len(kept) > 0
    assert all(isinstance(t["text"], str) and t["turn"] >= 0 for t in kept)
    for sc, summary in result["scenarios"].items():  # words_keep: over the scenario's media turns only
        media_turns = [c["words_keep"] for c in cases if c["scenario"] == sc and "words_keep" in c]
        assert summary.get("words_keep") == (sum(media_turns) / len(media_turns) if media_turns else None)
    assert "words_keep" not in result["scenarios"]["recall"] and "words_keep" in result["scenarios"]["edit"]


def test_train_small_stage_8_is_opt_in():
    """`make train-small` runs stages 1-7 (what the committed weights were trained with); `--fresh2 N`
    adds stage 8 on N more conversations, and its conversations join the refit."""
    from training.small import _plan, _refit_plan, build_parser

    assert sorted(_plan(build_parser().parse_args([])).stages) == [1, 2, 3, 4, 5, 6, 7]
    plan = _plan(build_parser().parse_args(["--fresh2", "800"]))
    assert sorted(plan.stages) == [1, 2, 3, 4, 5, 6, 7, 8] and plan.fresh2 == 800
    def refit_plan(argv):
        args = build_parser().parse_args(argv)
        return _refit_plan(args, _plan(args))

    assert refit_plan(["--refit", ",,,,,,,400"]).fresh2 == 400
    # without stage 8 the refit uses (and its plan, which the model card reads, records) none of its conversations
    assert refit_plan([]).fresh2 == 0
    assert refit_plan(["--fresh2", "800"]).fresh2 > 0


def test_train_small_stage_9_is_opt_in_and_sized_for_a_gpu(tmp_path, monkeypatch):
    """`--fresh3 N` adds stage 9 (batch 32) after whichever stage is last before it; `--max-minutes`
    gives its loop a time budget; `--gpu` leaves the device to accelerate (no `--cpu`)."""
    import training.stages
    from training.small import _plan, _previous_stage, _refit_plan, build_parser, run_stage

    assert 9 not in _plan(build_parser().parse_args([])).stages
    args = build_parser().parse_args(["--fresh3", "5000", "--max-minutes", "4.5"])
    plan = _plan(args)
    assert sorted(plan.stages) == [1, 2, 3, 4, 5, 6, 7, 9] and _previous_stage(plan, 9) == 7
    assert plan.stages[9].batch_size == 32 and plan.stages[9].max_minutes == 4.5
    assert _refit_plan(args, plan).fresh3 > 0 and _refit_plan(build_parser().parse_args([]), _plan(build_parser().parse_args([]))).fresh3 == 0
    assert _previous_stage(_plan(build_parser().parse_args(["--fresh3", "10", "--fresh2", "10"])), 9) == 8
    from training.small import main

    assert main(["--max-minutes", "5", "--work", str(tmp_path / "w")]) == 2  # a budget for a stage that does not run
    assert not (tmp_path / "w").exists()

    seen = []
    monkeypatch.setattr(training.stages, "main", lambda argv: seen.append(argv) or 0)
    files = {k: tmp_path / f"{k}.json" for k in ("fresh3", "dialogs", "varied")}
    for extra in ([], ["--gpu"]):
        a = build_parser().parse_args(["--fresh3", "5000", "--max-minutes", "4.5", *extra])
        a.targets_dir = str(tmp_path / "targets")
        run_stage(9, tmp_path / "work", plan, files, a, {"stages": {}})
    (cpu, gpu) = seen
    assert "--cpu" in cpu and "--cpu" not in gpu
    for argv in seen:
        assert argv[argv.index("--init") + 1].endswith("stage7") and argv[argv.index("--max-minutes") + 1] == "4.5"
        assert [argv[i + 1] for i, x in enumerate(argv) if x == "--data"] == [str(files[k]) for k in ("fresh3", "dialogs", "varied")]
