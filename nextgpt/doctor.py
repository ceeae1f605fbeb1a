"""What `nextgpt doctor` and `nextgpt convert` need to know about a profile without loading it."""

from __future__ import annotations

from pathlib import Path

from nextgpt.config import Profile, Settings


def _hub_cached(repo_id: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:  # not a valid repo id
        return False


def source_status(source: str, cache_dir: Path, tiny_dir: str, marker: str) -> tuple[str, bool]:
    """(description, present) for a component source: `tiny`, a local path or a hub id."""
    if source == "tiny":
        path = cache_dir / "tiny" / tiny_dir
        return (f"tiny, built at {path}" if path.exists() else f"tiny, built on first use into {path}"), True
    if source == "imagebind_huge":
        path = cache_dir / "imagebind_huge.pth"
        return (f"{path}" if path.exists() else f"imagebind_huge.pth not in {cache_dir} (downloaded on first use)"), path.exists()
    if source.startswith("pkg:"):
        from nextgpt.llm import package_file

        try:
            return f"{package_file(source)}", True
        except FileNotFoundError as e:
            return str(e), False
    path = Path(source).expanduser()
    if path.exists():
        return f"local {path}", True
    if source.startswith((".", "/", "~")):
        return f"local path {path} does not exist", False
    if _hub_cached(source, marker):
        return f"hub {source} (in the local hub cache)", True
    return f"hub {source} (not downloaded yet; needs the hub on first use)", False


def component_status(profile: Profile, cache_dir: Path):
    """Yields (component, device, status, ok) for every component of a profile."""
    llm = profile.llm
    llm_source = llm.source if not llm.gguf_file else str(Path(llm.source) / llm.gguf_file)
    yield ("llm", llm.device, *source_status(llm_source, cache_dir, "llm", "config.json"))
    backend, why = llm.backend_choice()
    yield ("llm backend", "", f"{backend} ({why})", True)
    yield ("encoder", profile.encoder.device, *source_status(profile.encoder.source, cache_dir, "imagebind", ""))
    for modality, dec in profile.decoders.items():
        yield (f"decoder {modality}", dec.device, *source_status(dec.source, cache_dir, modality, "model_index.json"))
    if profile.checkpoint:
        path = Path(profile.checkpoint).expanduser()
        ok = (path / "meta.json").is_file()
        hint = "" if ok else " — missing; see `nextgpt convert --help`"
        yield ("checkpoint", "", f"{path}{hint}", ok)
    else:
        yield ("checkpoint", "", "none: projections and new token rows are untrained (random)", True)


def encoder_dim(profile: Profile) -> int:
    if profile.encoder.source == "imagebind_huge":
        return 1024
    from nextgpt.encoder import TINY_ARCH

    arch = dict(TINY_ARCH, **profile.encoder.arch) if profile.encoder.source == "tiny" else profile.encoder.arch
    return arch.get("out_embed_dim", 1024)


def llm_layout_config(profile: Profile, cache_dir: Path, *, local_only: bool = False):
    """The profile's LLM config with `vocab_size` = its tokenizer's length + the 38 NExT-GPT tokens
    (the rows a converted file has). ValueError, one line, when the LLM cannot be read: a local
    folder that is not there, a hub id not downloaded (`local_only`) or unknown, a `tiny` not built
    yet (`local_only`: nothing is built or downloaded)."""
    from transformers import AutoConfig, AutoTokenizer

    from nextgpt.llm import resolve_source
    from nextgpt.tokens import NEW_TOKENS

    source = profile.llm.source
    if source == "tiny" and local_only and not (cache_dir / "tiny" / "llm" / "config.json").is_file():
        raise ValueError(f"the tiny LLM is not built yet in {cache_dir / 'tiny' / 'llm'}")
    if source.startswith(("/", ".", "~")) and not Path(source).expanduser().exists():
        raise ValueError(f"the LLM folder {Path(source).expanduser()} does not exist (llm.source in the config)")
    try:
        path, gguf_file = resolve_source(profile.llm, cache_dir)
    except FileNotFoundError as e:  # a pkg: file whose package is not installed
        raise ValueError(str(e)) from None
    kwargs = {"revision": profile.llm.revision} if profile.llm.revision else {}
    if gguf_file:  # parsing a GGUF takes minutes on a busy CPU; the model's own dequantised copy takes ms
        path, kwargs = _gguf_copy(path, gguf_file, cache_dir, build=not local_only), {}
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local_only, **kwargs)
        base_vocab = len(AutoTokenizer.from_pretrained(path, local_files_only=local_only, **kwargs))
    except (OSError, ValueError) as e:  # not found, not downloaded, no network, not a model folder
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise ValueError(f"cannot read the LLM {source!r}: {first}") from None
    config.vocab_size = base_vocab + len(NEW_TOKENS)
    return config


def _gguf_copy(path: str, gguf_file: str, cache_dir: Path, build: bool) -> str:
    """The dequantised copy of a GGUF LLM that `load_llm` keeps in the cache (made now if `build`)."""
    import torch

    from nextgpt.llm import _dequantised_copy, dequantised_copy_path

    copy = dequantised_copy_path(Path(path) / gguf_file, cache_dir)
    if (copy / "config.json").is_file():
        return str(copy)
    if not build:
        raise ValueError(f"{gguf_file} is not dequantised into {copy.parent} yet (it is on the profile's first use)")
    return _dequantised_copy(path, gguf_file, cache_dir, torch.float32)


def profile_fit(settings: Settings, name: str, sd, summary: dict) -> tuple[bool, str]:
    """(fits, one line): does the state dict `sd` (normalised keys) match profile `name`'s layout?
    The LLM's own sizes are checked only when its config is here already (nothing is downloaded);
    otherwise the file's own LLM sizes stand in and only the encoder and projectors are compared."""
    from nextgpt.checkpoint import DEFAULT_LORA_RANK, CheckpointError, _validate, official_layout

    profile = settings.profile(name)
    note = ""
    try:
        llm = llm_layout_config(profile, settings.cache_path, local_only=True)
    except ValueError as e:
        llm = summary["llm"]
        note = f" (LLM not checked: {e})"
        if None in llm.values():
            return False, "the file has no complete LLM part to compare" + note
    try:
        layout = official_layout(llm, encoder_dim(profile), profile.projectors, lora_rank=summary["lora_rank"] or DEFAULT_LORA_RANK)
        _validate(sd, layout, "")
    except CheckpointError as e:
        problems = e.mismatched + [f"missing {k}" for k in e.missing] + [f"unexpected {k}" for k in e.unexpected]
        counts = f"{len(e.mismatched)} mis-shaped, {len(e.missing)} missing, {len(e.unexpected)} unexpected keys"
        return False, f"does not fit: {counts}; first: {problems[0] if problems else e}" + note
    return True, "fits" + note


def check_official(settings: Settings, src: Path) -> tuple[list[str], list[str]]:
    """`nextgpt convert --check SRC`: (report lines, names of the profiles the file fits). Only reads."""
    from nextgpt.checkpoint import describe_official, normalise_keys, read_official

    sd = normalise_keys(read_official(src))
    s = describe_official(sd)
    llm, enc = s["llm"], s["encoder_dim"]
    dtypes = ", ".join(f"{d} ({n})" for d, n in sorted(s["dtypes"].items()))
    lines = [
        f"{src}: {s['tensors']} tensors, {s['parameters'] / 1e6:.1f} M parameters, {s['bytes'] / 2**20:.1f} MiB; dtype {dtypes}",
        f"  input projection  llama_proj: {enc} → {llm['hidden']}",
        f"  LLM               hidden {llm['hidden']}, {llm['layers']} layers, embedding and lm_head {llm['vocab']} rows"
        + (f" (= {llm['vocab'] - 38} + 38 NExT-GPT tokens)" if llm["vocab"] else ""),
        f"  LoRA              rank {s['lora_rank']}, {s['lora_keys']} tensors (q_proj out {llm['q_out']}, k_proj out {llm['kv_out']})",
    ]
    for m, p in s["projectors"].items():
        lines.append(
            f"  {m + ' projector':<17} {p['llm_hidden']} → {p['d_model']}, transformer {p['num_encoder_layers']}+"
            f"{p['num_decoder_layers']} layers (ff {p['dim_feedforward']}), {p['num_queries']} queries × {p['out_dim']}"
        )
    for m in sorted(set(("image", "video", "audio")) - set(s["projectors"])):
        lines.append(f"  {m + ' projector':<17} absent")
    if s["other_keys"]:
        lines.append(f"  other keys ({len(s['other_keys'])}): " + ", ".join(s["other_keys"][:5]) + (" ..." if len(s["other_keys"]) > 5 else ""))
    lines.append("profiles:")
    fits = []
    for name in settings.profiles:
        ok, why = profile_fit(settings, name, sd, s)
        fits += [name] if ok else []
        lines.append(f"  {name:<12} {why}")
    return lines, fits


def convert_for_profile(settings: Settings, profile_name: str, src: Path, dst: Path, overwrite: bool = False) -> Path:
    """Convert the released pytorch_model.pt, with the shapes the profile's LLM and encoder imply.
    A file that does not fit the profile but fits another names that one in the error."""
    from nextgpt.checkpoint import CheckpointError, convert_official, describe_official, normalise_keys, read_official

    profile = settings.profile(profile_name)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file")
    try:
        llm_config = llm_layout_config(profile, settings.cache_path)
    except ValueError as e:
        raise ValueError(f"profile {profile_name}: {e}") from None
    try:
        return convert_official(src, dst, llm_config, encoder_dim(profile), profile.projectors, overwrite=overwrite)
    except CheckpointError as e:
        if not e.has_problems:
            raise
        sd = normalise_keys(read_official(src))
        summary = describe_official(sd)
        others = [n for n in settings.profiles if n != profile_name and profile_fit(settings, n, sd, summary)[0]]
        if others:
            raise CheckpointError(f"{e}\nthe file fits profile {others[0]!r}: pass --profile {others[0]}") from None
        raise
