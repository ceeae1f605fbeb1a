"""The `discord:` section of config.yaml. Every key has a default; unknown keys are errors.

    discord:
      token: ...                 # better: the NEXTGPT_DISCORD_TOKEN environment variable (it wins)
      allowed_guilds: [123]      # empty list = every server the bot is in
      allowed_channels: [456]    # a thread counts as its parent channel; empty = every channel
      allowed_roles: [789]       # the member needs one of them; empty = everyone
      allow_dms: false
      per_user_queue_cap: 3      # a user's jobs waiting or running at once
      rate_limit_per_minute: 6   # jobs a user may submit in any 60 s
      batch_max: 4               # /imagine, /video, /audio waiting together share one decoder call; 1 = off
"""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field, SecretStr

TOKEN_ENV = "NEXTGPT_DISCORD_TOKEN"


class DiscordConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    token: SecretStr | None = Field(None, description=f"bot token; ${TOKEN_ENV} wins over this")
    allowed_guilds: list[int] = Field(default_factory=list, description="server ids; empty = all")
    allowed_channels: list[int] = Field(default_factory=list, description="channel ids (threads count as their parent); empty = all")
    allowed_roles: list[int] = Field(default_factory=list, description="role ids, any one suffices; empty = everyone")
    allow_dms: bool = Field(False, description="answer commands in direct messages")
    per_user_queue_cap: int = Field(3, ge=1, description="jobs one user may have waiting or running")
    rate_limit_per_minute: int = Field(6, ge=1, description="jobs one user may submit per rolling minute")
    max_queue: int = Field(100, ge=1, description="jobs waiting in total before new ones are refused")
    batch_max: int = Field(
        4, ge=1, le=64,
        description="most /imagine, /video or /audio requests (same modality, steps and guidance) waiting together "
                    "that are decoded in one call; 1 = one by one",
    )
    max_attachment_mb: float = Field(25.0, gt=0, description="largest attachment accepted, MiB")
    max_attachment_pixels: int = Field(40_000_000, ge=1, description="largest image/video frame (w×h) accepted")
    max_attachments: int = Field(4, ge=1, le=8, description="attachments in one message (checked before any download)")
    kv_cache_mb: float = Field(1024, ge=0, description="the chats' LLM key/value caches together, MiB (least recently used dropped first)")
    default_seed: int | None = Field(None, ge=0, le=2**63 - 1, description="seed when neither the server nor the command sets one")
    default_steps: int | None = Field(None, ge=1, le=1000, description="diffusion steps when not set elsewhere")
    default_guidance: float | None = Field(None, ge=0, le=100)
    default_max_new_tokens: int | None = Field(None, ge=1, le=8192)
    command_guilds: list[int] = Field(
        default_factory=list, description="register the commands in these servers only (instant); empty = globally"
    )
    sync_commands: bool = Field(True, description="register (sync) the slash commands at start-up")
    progress_interval_s: float = Field(1.5, ge=0, description="least time between two progress edits of one reply")
    warmup: bool = Field(True, description="load the model at start-up instead of on the first request")

    def resolved_token(self) -> str | None:
        """$NEXTGPT_DISCORD_TOKEN, else `token`, else None (empty strings count as unset)."""
        env = os.environ.get(TOKEN_ENV, "").strip()
        if env:
            return env
        if self.token is not None and self.token.get_secret_value().strip():
            return self.token.get_secret_value().strip()
        return None

    def defaults(self) -> dict:
        """Chat settings from this config (ChatSettings field names)."""
        out = {
            "seed": self.default_seed, "steps": self.default_steps,
            "guidance": self.default_guidance, "max_new_tokens": self.default_max_new_tokens,
        }
        return {k: v for k, v in out.items() if v is not None}

    @property
    def max_attachment_bytes(self) -> int:
        return int(self.max_attachment_mb * 2**20)
