"""A turn's settings, in one place: what each front end may set, what None means, what a regenerate keeps.

    s = ChatSettings(seed=7)                       # None everywhere else: the next layer decides
    s.set("steps", "20")                           # /set, /seed and Discord's /settings all parse here
    turn = ChatSettings.layered(server, command)   # later layers win where they are not None
    concrete = turn.resolved(profile)              # the values the turn really uses (saved with it)
    again = ChatSettings.pinned(saved_reply.settings)  # a saved turn's settings back (regenerate, replay)

**None means "not set here"**, always: the next layer down decides, and the last layer is the
profile (`profile.generation` for the LLM's settings; each decoder's own `steps`, `guidance` and
`safety_checker` for the media). `resolved(profile)` is the one place that turns None into the
profile's value; a profile without a seed (`generation.seed: null`) gets a fresh random seed there,
so every saved turn names the seed that makes it again.

**Regenerate** (the CLI's `/regenerate`, `/reseed`, Discord's 🔁 and 🎲, one behaviour): the last
user turn is answered again with the replaced reply's `seed`, `steps` and `guidance` pinned
(`REGENERATE_PINS`) over the current settings; `reseed` moves to that seed + 1. The other settings
(temperature, top_p, max_new_tokens, safety_checker) are the current ones. `regenerate_settings`
computes it; `assistant.session.Chat.regenerate` uses it.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, fields, replace

REGENERATE_PINS = ("seed", "steps", "guidance")  # what a regenerate keeps from the reply it replaces
_ALIASES = {"max_tokens": "max_new_tokens", "max-tokens": "max_new_tokens", "safety-checker": "safety_checker"}
_LIMITS = {"steps": (1, 500), "max_new_tokens": (1, 8192), "guidance": (0, 100), "temperature": (0, 10), "top_p": (1e-6, 1)}
_CLEAR = {"default", "none", "auto"}


def on_off(value: str) -> bool | None:
    """on / off (or true / false, yes / no, 1 / 0), or default (None); ValueError otherwise."""
    v = value.strip().lower()
    if v in _CLEAR:
        return None
    if v in ("on", "true", "yes", "1"):
        return True
    if v in ("off", "false", "no", "0"):
        return False
    raise ValueError(f"safety_checker takes on, off or default, not {value!r}")


@dataclass
class ChatSettings:
    """What `/set`, `/seed` and a Discord server's `/settings` change; None means "not set here"
    (see the module doc)."""

    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    safety_checker: bool | None = None  # the decoders' safety checker (a Discord server may turn it off)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def of(cls, values: dict | None) -> "ChatSettings":
        """From a dict (a server's saved settings, an API request); unknown keys are left out."""
        return cls(**{k: v for k, v in (values or {}).items() if k in cls.names()})

    @classmethod
    def layered(cls, *layers: "ChatSettings | dict | None") -> "ChatSettings":
        """The layers merged, later ones winning where they are not None."""
        out = cls()
        for layer in layers:
            if layer is None:
                continue
            values = layer if isinstance(layer, dict) else asdict(layer)
            for k, v in values.items():
                if k in cls.names() and v is not None:
                    setattr(out, k, v)
        return out

    @classmethod
    def pinned(cls, record: dict | None, keys=None) -> "ChatSettings":
        """The settings a saved reply was made with (its `settings` record), or only `keys` of them:
        how a regenerate and `nextgpt replay --rerun` pin a turn."""
        record = record or {}
        return cls(**{k: record.get(k) for k in (keys or cls.names()) if k in cls.names()})

    def set(self, key: str, value: str) -> str:
        """Parse and set one setting from text (`default` clears it); ValueError names the problem.
        Returns the setting's name (`max_tokens` is `max_new_tokens`)."""
        from nextgpt.limits import parse_seed

        key = _ALIASES.get(key, key)
        types = {f.name: f.type for f in fields(self)}
        if key not in types:
            raise ValueError(f"unknown setting {key!r}; settable: {', '.join(types)}")
        if key == "safety_checker":
            self.safety_checker = on_off(value)
        elif value.strip().lower() in _CLEAR:
            setattr(self, key, None)
        elif key == "seed":
            self.seed = parse_seed(value)
        else:
            setattr(self, key, self._number(key, types[key], value))
        return key

    @staticmethod
    def _number(key: str, kind, value: str):
        kind = int if "int" in str(kind) else float
        try:
            parsed = kind(value)
        except ValueError:
            raise ValueError(f"{key} takes {'a whole number' if kind is int else 'a number'}, not {value!r}") from None
        lo, hi = _LIMITS.get(key, (None, None))
        if lo is not None and not lo <= parsed <= hi:
            raise ValueError(f"{key} must be between {lo} and {hi}, not {value}")
        return parsed

    def resolved(self, profile) -> "ChatSettings":
        """The values a turn under `profile` really uses: the LLM's settings and the seed concrete
        (a profile without a seed draws one); steps, guidance and safety_checker stay None where not
        set (each decoder's own value; they differ per decoder)."""
        gen = profile.generation
        seed = self.seed if self.seed is not None else gen.seed
        return replace(
            self,
            seed=secrets.randbits(31) if seed is None else seed,
            temperature=gen.temperature if self.temperature is None else self.temperature,
            top_p=gen.top_p if self.top_p is None else self.top_p,
            max_new_tokens=gen.max_new_tokens if self.max_new_tokens is None else self.max_new_tokens,
        )

    def default(self, key: str, profile) -> str:
        """What None means for `key` under `profile`, as text ("?" when unknown)."""
        try:
            if key in ("steps", "guidance", "safety_checker"):
                values = {m: getattr(d, key) for m, d in profile.decoders.items()}
                if len(set(values.values())) == 1:
                    return str(next(iter(values.values())))
                return ", ".join(f"{m} {v}" for m, v in values.items())
            value = getattr(profile.generation, key)
            return "random" if key == "seed" and value is None else str(value)
        except Exception:  # noqa: BLE001 - only for display
            return "?"

    def record(self) -> dict:
        return asdict(self)


def regenerate_settings(current: ChatSettings, replaced: dict | None, *, reseed: bool = False) -> ChatSettings:
    """The settings a regenerate uses (module doc): `current` with the replaced reply's
    REGENERATE_PINS pinned over it; `reseed`: its seed + 1."""
    pins = ChatSettings.pinned(replaced, REGENERATE_PINS)
    out = ChatSettings.layered(current, pins)
    if reseed:
        base = pins.seed if pins.seed is not None else (current.seed or 0)
        out.seed = base + 1
    return out
