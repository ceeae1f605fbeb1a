"""`nextgpt discord`: the assistant in Discord servers (many users, one model).

    from bots.discord import run
    run(settings, profile="tiny")        # blocks until the bot stops; returns an exit status

The token comes from $NEXTGPT_DISCORD_TOKEN (or `discord.token` in config.yaml); it is never
printed, and every log record is scrubbed of it. See `bots.discord.bot` for the behaviour and
`bots.discord.config.DiscordConfig` for the settings.

Only `run` and `DiscordConfig` are imported eagerly; discord.py and the model load on use.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from bots.discord.config import TOKEN_ENV, DiscordConfig

__all__ = ["run", "DiscordConfig", "TOKEN_ENV"]

log = logging.getLogger(__name__)


def _error(message: str) -> int:
    print(f"nextgpt: error: {message}", file=sys.stderr)
    return 2


def _setup_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    from bots.discord.redact import RedactingFilter

    for handler in root.handlers:  # belt and braces beside the record factory
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def run(settings, profile: str | None = None, *, config: DiscordConfig | None = None) -> int:
    """Serve until interrupted. 0 on a clean stop, 2 for a missing/rejected token or bad setup."""
    if config is None:
        from nextgpt.config import ConfigError, validate_section

        try:
            config = validate_section(settings, "discord", DiscordConfig)
        except ConfigError as e:
            return _error(str(e))
    cfg = config
    token = cfg.resolved_token()
    if not token:
        return _error(f"no Discord bot token: set {TOKEN_ENV} (or discord.token in config.yaml)")
    from bots.discord import redact

    redact.install(token)
    _setup_logging()

    import aiohttp
    import discord

    from assistant.agent import Assistant
    from bots.discord.bot import NextGPTBot
    from bots.discord.engine import Engine
    from memory import Memory

    assistant = Assistant(settings, profile)
    memory = Memory.open(data_dir=settings.data_path)
    engine = Engine(assistant, memory, max_cache_bytes=int(cfg.kv_cache_mb * 2**20))

    async def serve() -> None:
        bot = NextGPTBot(engine=engine, config=cfg, data_dir=settings.data_path)
        async with bot:
            await bot.start(token, reconnect=True)

    try:
        asyncio.run(serve())
    except discord.LoginFailure:
        return _error(f"Discord rejected the bot token (401 Unauthorized): check {TOKEN_ENV}")
    except discord.PrivilegedIntentsRequired:
        return _error("Discord refused the Message Content intent: enable it for this bot in the Developer Portal "
                      "(Bot → Privileged Gateway Intents)")
    except discord.ConnectionClosed as e:
        if e.code == 4004:
            return _error(f"Discord rejected the bot token (gateway close 4004): check {TOKEN_ENV}")
        return _error(f"the Discord gateway closed the connection (code {e.code})")
    except (aiohttp.ClientConnectionError, discord.GatewayNotFound, OSError) as e:
        return _error(f"cannot reach Discord ({type(e).__name__}); check the network")
    except KeyboardInterrupt:
        print("\nstopped", file=sys.stderr)
        return 130
    finally:
        memory.close()
    return 0
