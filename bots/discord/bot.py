"""The Discord layer: slash commands, buttons and thread messages over the job queue and the engine.

Thin on purpose: access checks, acknowledging interactions in time, turning queue state into
status edits, and uploading what the engine made (shrunk to the upload limit). Model work only
ever happens in jobs on the queue's single worker thread; the event loop awaits their futures.

Where replies go:
- `/chat` (and `/imagine`, `/video`, `/audio` outside a chat thread) defers publicly, turns the
  deferred response into the thread's starter message and edits it with the queue position,
  progress and finally the reply with its files and buttons. Past the interaction token's
  15 minutes the reply is posted in the thread instead.
- messages in a chat thread (and /commands there) continue its session; the bot replies to the
  message and edits that reply as the job advances.

Batches: `/imagine`, `/video` and `/audio` jobs are released with a batch key (modality, steps,
guidance), so up to `batch_max` of them waiting together share one decoder call
(bots.discord.batch); each still has its own session, reply and buttons.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional

import discord
from discord import app_commands

from assistant.settings import ChatSettings
from bots.discord import redact
from bots.discord.batch import DecoderBatcher
from bots.discord.config import DiscordConfig
from bots.discord.engine import Engine, TurnResult
from bots.discord.media import Fitted, fit_media, human_size
from bots.discord.queue import FairQueue, Job, JobCancelled, QueueRejected, Worker
from bots.discord.store import Store

log = logging.getLogger(__name__)

NO_MENTIONS = discord.AllowedMentions.none()
TOKEN_LIFE = timedelta(minutes=15)
TOKEN_MARGIN = timedelta(seconds=45)  # stop using the token a little before Discord does
ACK_BUDGET_S = 1.5  # time an attachment check may take before the interaction must be deferred
MAX_CONTENT = 2000
EMOJI = {"image": "🖼️", "video": "🎞️", "audio": "🔊"}
MEDIA_TYPES = ("image/", "audio/", "video/")
INVITE_PERMISSIONS = discord.Permissions(
    view_channel=True, send_messages=True, send_messages_in_threads=True, create_public_threads=True,
    create_private_threads=True, attach_files=True, embed_links=True, read_message_history=True,
)


class AttachmentRejected(Exception):
    """An incoming attachment that will not be used; `str(e)` says why, naming the file."""


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: max(0, n - 1)] + "…"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _token_error(e: discord.HTTPException) -> bool:
    """The interaction token no longer works (expired, or the interaction is gone)."""
    return e.status in (401, 404) or e.code in (10015, 10062, 50027)


# ------------------------------------------------------------------------------------------------------------
# where a job's status and reply go


class Responder:
    limit: int

    async def status(self, content: str, view: discord.ui.View | None = None) -> None:
        raise NotImplementedError

    async def final(self, content: str, files: list[tuple[Path, str]], view: discord.ui.View | None) -> discord.Message | None:
        raise NotImplementedError


def _files(files: list[tuple[Path, str]]) -> list[discord.File]:
    return [discord.File(p, filename=name) for p, name in files]


class ChannelResponder(Responder):
    """Posts one message in a channel or thread (a reply to `reference` if given) and edits it."""

    def __init__(self, channel, *, limit: int, reference: discord.Message | None = None, ping: discord.abc.User | None = None):
        self.channel = channel
        self.reference = reference
        self.limit = limit
        self.ping = ping
        self.message: discord.Message | None = None

    async def status(self, content, view=None):
        if self.message is None:
            self.message = await self.channel.send(
                content, view=view or discord.utils.MISSING, allowed_mentions=NO_MENTIONS, reference=self.reference,
                mention_author=False,
            )
        else:
            self.message = await self.message.edit(content=content, view=view, allowed_mentions=NO_MENTIONS)

    async def final(self, content, files, view):
        mentions = discord.AllowedMentions(everyone=False, roles=False, users=[self.ping], replied_user=False) if self.ping else NO_MENTIONS
        if self.message is not None:
            self.message = await self.message.edit(
                content=content, attachments=_files(files), view=view, allowed_mentions=NO_MENTIONS,
            )
        else:
            self.message = await self.channel.send(
                content, files=_files(files), view=view or discord.utils.MISSING, allowed_mentions=mentions,
                reference=self.reference, mention_author=False,
            )
        return self.message


class InteractionResponder(Responder):
    """Edits the (deferred) interaction response while its token lives; after that (15 minutes, or
    Discord refusing the token) the reply is posted in `fallback`, pinging only the requester."""

    def __init__(self, interaction: discord.Interaction, *, fallback, limit: int, user: discord.abc.User,
                 original: discord.Message | None = None):
        self.itx = interaction
        self.fallback = fallback
        self.limit = limit
        self.user = user
        self.dead = False
        self.original = original

    def token_alive(self) -> bool:
        age = datetime.now(timezone.utc) - self.itx.created_at
        return not self.dead and age < TOKEN_LIFE - TOKEN_MARGIN

    async def _edit(self, **kwargs) -> discord.Message | None:
        if not self.token_alive():
            return None
        try:
            msg = await self.itx.edit_original_response(allowed_mentions=NO_MENTIONS, **kwargs)
        except discord.HTTPException as e:
            if not _token_error(e):
                raise
            log.info("interaction %s: token no longer valid (%s); the reply will be posted in the channel", self.itx.id, e.status)
            self.dead = True
            return None
        self.original = msg
        return msg

    async def status(self, content, view=None):
        await self._edit(content=content, view=view)  # past the token's life, progress is no longer shown

    async def final(self, content, files, view):
        msg = await self._edit(content=content, attachments=_files(files), view=view)
        if msg is not None:
            return msg
        channel = getattr(self.original, "channel", None)
        if self.original is not None and hasattr(channel, "get_partial_message"):
            # tidy the stale progress message through the channel API (the token is gone; the bot
            # may still edit its own message)
            try:
                await channel.get_partial_message(self.original.id).edit(
                    content=_clip(self.original.content.split("\n", 1)[0], 300)
                    + "\n-# ⌛ this took a while: the reply was posted in the thread",
                    view=None, allowed_mentions=NO_MENTIONS)
            except discord.HTTPException as e:
                log.debug("could not tidy the original response: %s", e.status)
        late = ChannelResponder(self.fallback, limit=self.limit, ping=self.user)
        return await late.final(content, files, view)


# ------------------------------------------------------------------------------------------------------------
# buttons (persistent: their state is in the custom_id, so they work after a restart)


class ReplyButton(discord.ui.DynamicItem[discord.ui.Button], template=r"ngpt:(?P<action>reseed|regen|info):(?P<key>[0-9a-f]{6,32})"):
    LOOK = {"reseed": ("🎲", "Re-seed"), "regen": ("🔁", "Regenerate"), "info": ("ℹ️", "Info")}

    def __init__(self, action: str, key: str):
        emoji, label = self.LOOK[action]
        super().__init__(discord.ui.Button(
            label=label, emoji=emoji, style=discord.ButtonStyle.secondary, custom_id=f"ngpt:{action}:{key}",
        ))
        self.action = action
        self.key = key

    @classmethod
    async def from_custom_id(cls, interaction, item, match):
        return cls(match["action"], match["key"])

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.client.on_reply_button(interaction, self.action, self.key)


class CancelButton(discord.ui.DynamicItem[discord.ui.Button], template=r"ngpt:cancel:(?P<job>[0-9]+)"):
    def __init__(self, job_id: int):
        super().__init__(discord.ui.Button(
            label="Cancel", emoji="✖️", style=discord.ButtonStyle.danger, custom_id=f"ngpt:cancel:{job_id}",
        ))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(cls, interaction, item, match):
        return cls(int(match["job"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.client.on_cancel_button(interaction, self.job_id)


def reply_view(key: str) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for action in ("reseed", "regen", "info"):
        view.add_item(ReplyButton(action, key))
    return view


def cancel_view(job: Job) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(CancelButton(job.id))
    return view


def format_info(turn) -> str:
    """The ℹ button's text, from the reply as the session saved it (memory's TurnInfo)."""
    settings = turn.settings or {}
    decoders = settings.get("decoders") or {}
    lines = []
    for m in turn.media_out:
        meta = m.meta or {}
        lines.append(
            f"{EMOJI.get(m.modality, '')} **{m.modality}** — seed `{meta.get('seed')}` · steps `{meta.get('steps')}` · "
            f"guidance `{meta.get('guidance')}` · decoder `{decoders.get(m.modality)}`"
        )
    if not lines:
        lines.append(f"seed `{settings.get('seed')}`")
    lines.append(f"model: profile `{settings.get('profile')}` · LLM `{settings.get('llm')}`")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------


class _Tree(app_commands.CommandTree):
    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        problem = self.client.access_problem(interaction.user, interaction.guild, interaction.channel)
        if problem:
            await interaction.response.send_message(problem, ephemeral=True, allowed_mentions=NO_MENTIONS)
            return False
        return True

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        log.error("command %s failed", interaction.command and interaction.command.name, exc_info=error)
        message = "⚠️ Something went wrong on my side; the error was logged."
        try:
            if interaction.response.is_done():
                await interaction.followup.send(message, ephemeral=True, allowed_mentions=NO_MENTIONS)
            else:
                await interaction.response.send_message(message, ephemeral=True, allowed_mentions=NO_MENTIONS)
        except discord.HTTPException:
            pass


class NextGPTBot(discord.Client):
    def __init__(
        self, *, engine: Engine, config: DiscordConfig | None = None, data_dir: str | Path,
        queue: FairQueue | None = None, **client_options: Any,
    ):
        intents = discord.Intents.default()
        intents.message_content = True  # plain messages in chat threads (privileged: enable it in the portal)
        super().__init__(intents=intents, allowed_mentions=NO_MENTIONS, **client_options)
        self.engine = engine
        self.config = config or DiscordConfig()
        self.data_dir = Path(data_dir)
        self.store = Store(self.data_dir / "discord.db")
        self.queue = queue or FairQueue(
            per_user_cap=self.config.per_user_queue_cap, rate_per_minute=self.config.rate_limit_per_minute,
            max_waiting=self.config.max_queue, batch_max=self.config.batch_max,
        )
        self.batcher = DecoderBatcher(self.queue, self.engine)
        self.worker = Worker(self.queue, batch_runner=self.batcher)
        self.tmp_root = self.data_dir / "discord-tmp"
        self._threads: dict[int, str] = {}  # chat thread (or DM channel) id → current session id
        contexts = app_commands.AppCommandContext(guild=True, dm_channel=self.config.allow_dms, private_channel=False)
        self.tree = _Tree(self, allowed_contexts=contexts, allowed_installs=app_commands.AppInstallationType(guild=True))
        self._register_commands()
        self.synced: list[app_commands.AppCommand] = []

    # -------------------------------------------------------------------------------------------- lifecycle
    async def login(self, token: str) -> None:
        redact.install(token.strip())  # before discord.py can log anything that might hold it
        await super().login(token)

    async def setup_hook(self) -> None:
        shutil.rmtree(self.tmp_root, ignore_errors=True)
        self.tmp_root.mkdir(parents=True, exist_ok=True)
        self._threads = await asyncio.to_thread(self.store.current_threads)
        self.add_dynamic_items(ReplyButton, CancelButton)
        if not self.worker.is_alive():
            self.worker.start()
        if self.config.warmup:
            self.queue.submit(0, lambda job: self.engine.warmup(), label="warm-up", exempt=True)
        if self.config.sync_commands:
            await self.sync_commands()

    async def sync_commands(self) -> None:
        try:
            if self.config.command_guilds:
                for gid in self.config.command_guilds:
                    guild = discord.Object(gid)
                    self.tree.copy_global_to(guild=guild)
                    self.synced += await self.tree.sync(guild=guild)
            else:
                self.synced = await self.tree.sync()
            log.info("registered %d slash commands: %s", len(self.synced), ", ".join(sorted({c.name for c in self.synced})))
        except discord.HTTPException as e:
            log.error("could not register the slash commands (%s %s); was the bot invited with the "
                      "applications.commands scope?", e.status, e.text)

    async def on_ready(self) -> None:
        log.info("connected as %s (id %s) to %d server(s)", self.user, self.user and self.user.id, len(self.guilds))
        if self.application_id:
            log.info("invite link: %s", discord.utils.oauth_url(
                self.application_id, permissions=INVITE_PERMISSIONS, scopes=("bot", "applications.commands")))

    async def close(self) -> None:
        self.queue.close()  # waiting jobs are cancelled (their replies say so); the running one finishes
        await super().close()
        if self.worker.is_alive():
            await asyncio.to_thread(self.worker.join, 5)  # a job mid-generation is abandoned (its question is saved)
        self.store.close()

    # -------------------------------------------------------------------------------------------- access
    def access_problem(self, user, guild, channel) -> str | None:
        """Why `user` may not use the bot here (one line), or None."""
        cfg = self.config
        if guild is None:
            return None if cfg.allow_dms else "I don't answer direct messages; use me in a server channel."
        if cfg.allowed_guilds and guild.id not in cfg.allowed_guilds:
            return "I'm not enabled in this server."
        if cfg.allowed_channels:
            ids = {getattr(channel, "id", None), getattr(channel, "parent_id", None)}
            if not ids & set(cfg.allowed_channels):
                return "I'm not enabled in this channel; ask a moderator where I can be used."
        if cfg.allowed_roles:
            roles = {r.id for r in getattr(user, "roles", ()) or ()}
            if not roles & set(cfg.allowed_roles):
                return "You need one of the roles that may use me; ask a moderator."
        return None

    # -------------------------------------------------------------------------------------------- helpers
    def _upload_limit(self, interaction: discord.Interaction | None = None, guild: discord.Guild | None = None) -> int:
        """Discord's per-interaction limit when there is one, else the server's, else Discord's default."""
        if interaction is not None and getattr(interaction, "filesize_limit", None):
            return int(interaction.filesize_limit)
        guild = guild or (interaction.guild if interaction is not None else None)
        if guild is not None:
            return int(guild.filesize_limit)
        return discord.utils.DEFAULT_FILE_SIZE_LIMIT_BYTES

    def _settings(self, guild_id: int | None, overrides: dict | None = None) -> ChatSettings:
        """The chat settings of a turn here: config defaults < the server's /settings < the command's."""
        return ChatSettings.layered(self.config.defaults(), self.store.guild_settings(guild_id), overrides)

    def _precheck(self, attachment: discord.Attachment) -> str | None:
        """Instant checks from the attachment's metadata (no download)."""
        name = attachment.filename
        cap = self.config.max_attachment_bytes
        if attachment.size > cap:
            return f"⚠️ `{name}` is {human_size(attachment.size)}; the largest attachment I take is {human_size(cap)}."
        ctype = (attachment.content_type or "").split(";")[0].strip().lower()
        if ctype and not ctype.startswith(MEDIA_TYPES):
            return f"⚠️ `{name}` is `{ctype}`; I take images, audio and video."
        if attachment.width and attachment.height and attachment.width * attachment.height > self.config.max_attachment_pixels:
            return (f"⚠️ `{name}` is {attachment.width}×{attachment.height} pixels; the most I take is "
                    f"{self.config.max_attachment_pixels:,} pixels.")
        return None

    async def _fetch(self, attachment: discord.Attachment, folder: Path) -> tuple[str, Path]:
        """Download and check an attachment (type by content, size, decompression bombs): (modality, path)."""
        from nextgpt.media import AttachmentError, validate_attachment

        problem = self._precheck(attachment)
        if problem:
            raise AttachmentRejected(problem)
        suffix = re.sub(r"[^A-Za-z0-9]", "", Path(attachment.filename).suffix)[:8]
        path = folder / f"{attachment.id}{'.' + suffix if suffix else ''}"
        try:
            await attachment.save(path)
        except discord.HTTPException as e:
            raise AttachmentRejected(f"⚠️ I couldn't download `{attachment.filename}` ({e.status}); try again.") from None
        try:
            modality = await asyncio.to_thread(
                validate_attachment, path, self.config.max_attachment_bytes, self.config.max_attachment_pixels,
            )
        except AttachmentError as e:
            raise AttachmentRejected(f"⚠️ `{attachment.filename}`: {e.problem}.") from None
        return modality, path

    def _tmpdir(self) -> Path:
        self.tmp_root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=self.tmp_root))

    async def _ephemeral(self, interaction: discord.Interaction, content: str) -> None:
        if interaction.response.is_done():
            await interaction.followup.send(content, ephemeral=True, allowed_mentions=NO_MENTIONS)
        else:
            await interaction.response.send_message(content, ephemeral=True, allowed_mentions=NO_MENTIONS)

    def _status_text(self, job: Job) -> tuple[str, bool]:
        """(status line, still waiting)."""
        position = self.queue.position(job)
        if position is not None and position > 0:
            ahead = position - 1
            who = "you're next" if ahead == 0 else f"{ahead} job{'s' * (ahead != 1)} ahead of you"
            if self.queue.batched(job):
                who += ", in the batch now running"
            return f"⏳ Queued — position **{position}** ({who}).", True
        if job.progress is not None:
            modality, step, total = job.progress
            return f"⚙️ Generating {EMOJI.get(modality, '')} {modality}: step {step}/{total}…", False
        if job.text:
            return f"✍️ Writing…\n> {_clip(_one_line(job.text), 300)}", False
        return "⚙️ Thinking…", False

    @staticmethod
    def _compose(header: str, body: str) -> str:
        return _clip(f"{header}\n{body}" if header else body, MAX_CONTENT)

    # -------------------------------------------------------------------------------------------- running a job
    async def _follow(
        self, job: Job, responder: Responder, *, header: str, thread_id: int, user_id: int,
    ) -> discord.Message | None:
        """Show the job's queue position and progress, then its reply with files and buttons."""
        future = asyncio.wrap_future(job.future)
        view = cancel_view(job)
        shown, shown_at = None, float("-inf")
        loop = asyncio.get_running_loop()
        while not future.done():
            text, waiting = self._status_text(job)
            if text != shown and loop.time() - shown_at >= self.config.progress_interval_s:
                shown, shown_at = text, loop.time()
                try:
                    await responder.status(self._compose(header, text), view if waiting else None)
                except discord.HTTPException as e:  # progress is best effort
                    log.warning("progress edit failed: %s %s", e.status, e.text)
            await asyncio.wait({future}, timeout=min(0.25, max(0.05, self.config.progress_interval_s)))
        try:
            result: TurnResult = future.result()
        except JobCancelled:
            await self._safe_final(responder, self._compose(header, "✖️ Cancelled."))
            return None
        except (ValueError, KeyError) as e:  # empty message, nothing to regenerate, unknown session...
            await self._safe_final(responder, self._compose(header, f"⚠️ {_one_line(str(e))}"))
            return None
        except Exception as e:
            log.exception("job %s (%s) failed", job.id, job.label)
            await self._safe_final(responder, self._compose(
                header, f"⚠️ Generation failed: {type(e).__name__}: {_clip(_one_line(str(e)), 300)}"))
            return None
        return await self._deliver(result, responder, header=header, thread_id=thread_id, user_id=user_id)

    async def _safe_final(self, responder: Responder, content: str) -> None:
        """A last word without files or buttons (cancelled, failed); logged, never raised."""
        try:
            await responder.final(content, [], None)
        except discord.HTTPException as e:
            log.warning("could not post %r: %s %s", _clip(content, 80), e.status, e.text)

    async def _deliver(self, result: TurnResult, responder: Responder, *, header: str, thread_id: int, user_id: int):
        workdir = self._tmpdir()
        try:
            media = [m for m in result.media if m.path is not None]
            # Discord takes MAX_CONTENT characters per message and the upload limit for all of its
            # files together: a text too long for the message goes along as reply.txt when it fits
            # in half the limit (the media share the rest), else it is clipped and says so
            text = result.text.strip() or "*(no text)*"
            seeds = ", ".join(str(m.seed) for m in result.media)
            longest_tail = 600 + len(seeds)  # the notes below, at most (each clipped)
            full_text = None
            if len(text) > MAX_CONTENT - len(header) - longest_tail - 4:
                data = result.text.encode("utf-8")
                if len(data) <= responder.limit // (2 if media else 1):
                    full_text = workdir / "reply.txt"
                    full_text.write_bytes(data)
            reserved = full_text.stat().st_size if full_text is not None else 0
            budget = (responder.limit - reserved) // max(1, len(media))  # shared when a reply has several files
            fitted: list[Fitted] = await asyncio.to_thread(
                lambda: [
                    fit_media(m.path, m.modality, budget, workdir, preview_path=m.preview_path,
                              name=f"{m.modality}-{m.seed}" if m.seed is not None else m.modality)
                    for m in media
                ]
            )
            files = [(f.path, f.filename) for f in fitted if f.path is not None]
            notes = [f"-# ⚠️ {_clip(f.note, 200)}" for f in fitted if f.note]
            notes += [f"-# ⚠️ the {f.modality} decoder ({f.tool}) failed: {_clip(_one_line(f.error), 200)}" for f in result.failures]
            if result.media:
                notes.append(f"-# 🎲 seed {seeds} · profile {self.engine.profile_name}")
            tail = "\n".join(notes)
            room = MAX_CONTENT - len(header) - len(tail) - 4
            if len(text) > room:
                if full_text is not None:
                    files.append((full_text, "reply.txt"))
                marker = " *(full text attached)*" if full_text is not None else " *(clipped)*"
                text = _clip(text, max(50, room - len(marker))) + marker
            content = _clip("\n".join(x for x in (header, text, tail) if x), MAX_CONTENT)
            key = None
            if result.media:
                key = await asyncio.to_thread(self.store.add_reply, result.session_id, thread_id, result.turn_index, user_id)
            else:
                await asyncio.to_thread(self.store.supersede, result.session_id)
            view = reply_view(key) if key else None
            try:
                return await responder.final(content, files, view)
            except discord.HTTPException as e:
                log.error("could not post the reply: %s %s", e.status, e.text)
                await self._safe_final(responder, self._compose(header, f"⚠️ Discord refused the reply ({e.status}): {_clip(e.text, 200)}"))
                return None
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    # -------------------------------------------------------------------------------------------- slash commands
    def _register_commands(self) -> None:
        tree = self.tree

        @tree.command(name="chat", description="Talk to the assistant; opens a thread that remembers the conversation")
        @app_commands.describe(
            prompt="what to say or ask", attachment="an image, audio or video file",
            private="a private thread only you (and people you add) can see",
            seed="seed for the media (same seed, same result)", steps="diffusion steps", guidance="guidance scale",
        )
        async def chat(interaction: discord.Interaction, prompt: str, attachment: Optional[discord.Attachment] = None,
                       private: bool = False, seed: Optional[int] = None,
                       steps: Optional[app_commands.Range[int, 1, 1000]] = None,
                       guidance: Optional[app_commands.Range[float, 0.0, 100.0]] = None):
            await self.generate(interaction, prompt=prompt, attachment=attachment, want=[], private=private,
                                overrides={"seed": seed, "steps": steps, "guidance": guidance}, label="/chat")

        def forced(name: str, modality: str, description: str):
            @tree.command(name=name, description=description)
            @app_commands.describe(prompt="what to make", attachment="an image, audio or video file to start from",
                                   seed="seed (same seed, same result)", steps="diffusion steps", guidance="guidance scale")
            async def command(interaction: discord.Interaction, prompt: str,
                              attachment: Optional[discord.Attachment] = None, seed: Optional[int] = None,
                              steps: Optional[app_commands.Range[int, 1, 1000]] = None,
                              guidance: Optional[app_commands.Range[float, 0.0, 100.0]] = None):
                await self.generate(interaction, prompt=prompt, attachment=attachment, want=[modality],
                                    overrides={"seed": seed, "steps": steps, "guidance": guidance}, label=f"/{name}")
            return command

        forced("imagine", "image", "Make an image (in a chat thread: continues that conversation)")
        forced("video", "video", "Make a video clip (in a chat thread: continues that conversation)")
        forced("audio", "audio", "Make a sound (in a chat thread: continues that conversation)")

        @tree.command(name="regenerate", description="Answer the last message of this chat thread again")
        @app_commands.describe(reseed="use a new seed (different media)")
        async def regenerate(interaction: discord.Interaction, reseed: bool = False):
            session_id = self._threads.get(interaction.channel_id)
            if session_id is None:
                return await self._ephemeral(interaction, "Use /regenerate inside one of my chat threads.")
            await self.regenerate(interaction, session_id, reseed=reseed)

        @tree.command(name="reset", description="Forget this chat thread's conversation and start afresh")
        async def reset(interaction: discord.Interaction):
            await self.reset(interaction)

        @tree.command(name="history", description="Your chat sessions (only you see this)")
        async def history(interaction: discord.Interaction):
            await self.history(interaction)

        @tree.command(name="settings", description="Server defaults for generation (Manage Server only)")
        @app_commands.describe(key="the setting to change (leave empty to see them all)",
                               value="a number (safety_checker: on or off), or 'default' to clear the server's value")
        @app_commands.choices(key=[app_commands.Choice(name=k, value=k) for k in ChatSettings.names()])
        @app_commands.default_permissions(manage_guild=True)
        @app_commands.guild_only()
        async def settings(interaction: discord.Interaction, key: Optional[app_commands.Choice[str]] = None,
                           value: Optional[str] = None):
            await self.server_settings(interaction, key.value if key else None, value)

    # -------------------------------------------------------------------------------------------- /chat & co
    async def generate(
        self, interaction: discord.Interaction, *, prompt: str, attachment: discord.Attachment | None,
        want: list[str], private: bool = False, overrides: dict | None = None, label: str = "",
    ) -> None:
        user = interaction.user
        if attachment is not None and (problem := self._precheck(attachment)):
            return await self._ephemeral(interaction, problem)
        session_id = self._threads.get(interaction.channel_id)

        async def prepare(folder: Path) -> Intake | None:
            nonlocal private
            check = asyncio.create_task(self._fetch(attachment, folder)) if attachment is not None else None
            if check is not None:  # wait for the check only as long as Discord's 3 s allow
                age = (datetime.now(timezone.utc) - interaction.created_at).total_seconds()
                await asyncio.wait({check}, timeout=max(0.0, min(ACK_BUDGET_S, 2.0 - max(0.0, age))))
                if check.done() and isinstance(check.exception(), AttachmentRejected):
                    await self._ephemeral(interaction, str(check.exception()))
                    return None
            in_thread = session_id is not None
            private = private and not in_thread and interaction.guild is not None
            await interaction.response.defer(thinking=True, ephemeral=private)
            staged = []
            if check is not None:
                try:
                    staged = [await check]
                except AttachmentRejected as e:  # slow check: drop the public placeholder, answer privately
                    try:
                        await interaction.delete_original_response()
                    except discord.HTTPException:
                        pass
                    await interaction.followup.send(str(e), ephemeral=True, allowed_mentions=NO_MENTIONS)
                    return None
            header = f"{user.mention}: {_clip(_one_line(prompt), 300)}" + (f" 📎 `{attachment.filename}`" if attachment else "")
            limit = self._upload_limit(interaction)
            if in_thread:
                thread = interaction.channel
                responder: Responder = InteractionResponder(interaction, fallback=thread, limit=limit, user=user)
                sid = session_id
            else:
                opened = await self._open_chat(interaction, prompt, header, private)
                if opened is None:
                    return None
                sid, thread, responder = opened
            return Intake(sid, thread, responder, staged, header="" if private else header)

        async def reject(content: str) -> None:
            await self._ephemeral(interaction, content)

        await self._intake(user.id, label=label, text=prompt, want=want, guild_id=interaction.guild_id,
                           overrides=overrides, prepare=prepare, reject=reject)

    async def _intake(self, user_id: int, *, label: str, text: str, want: list[str], guild_id: int | None,
                      overrides: dict | None, prepare, reject) -> None:
        """The one way from a request (a slash command, a plain message) to its reply. A place in the
        queue first (a user over a limit costs no download or decoding: `reject` says why); then
        `prepare(folder)`, the front end's part (attachments fetched into `folder`, the session and
        its thread found or opened, where the reply goes; None after telling the user why not); then
        the turn is released (a direct media request may share its decoder call with others like it,
        bots.discord.batch) and followed to its reply. Any way out before the job ran cancels it;
        the fetched files live until the worker is done with them."""
        try:
            job = self.queue.submit(user_id, _not_prepared, label=label, hold=True)
        except QueueRejected as e:
            return await reject(f"⏳ {e}")
        folder = self._tmpdir()
        try:
            intake = await prepare(folder)
            if intake is None:
                return
            await asyncio.to_thread(self.store.set_last_user, intake.session_id, user_id)
            settings = self._settings(guild_id, overrides)
            job.fn = self.engine.work(intake.session_id, text=text, attachments=intake.attachments, want=want,
                                      settings=settings)
            key = (want[0], settings.steps, settings.guidance) if len(want) == 1 else None
            if key is not None and key[0] in self.batcher.solo_only:
                key = None
            self.queue.release(job, batch_key=key, batch_scope=intake.session_id)
            await self._follow(job, intake.responder, header=intake.header, thread_id=intake.thread.id, user_id=user_id)
        finally:
            if not job.done:
                self.queue.cancel(job.id)
            if not job.done:  # running: keep the files until the worker is done with them
                await asyncio.to_thread(_wait_quietly, job)
            shutil.rmtree(folder, ignore_errors=True)

    async def _open_chat(self, interaction: discord.Interaction, prompt: str, header: str, private: bool):
        """A new session and its thread: (session id, thread, responder), or None after telling the user why."""
        user, channel = interaction.user, interaction.channel
        title = _clip(_one_line(prompt), 90) or "chat"
        limit = self._upload_limit(interaction)
        session = await asyncio.to_thread(self.engine.new_session, _clip(_one_line(prompt), 60) or None)
        if interaction.guild is None:  # a DM has no threads: the DM channel holds the session
            thread = channel
            responder: Responder = InteractionResponder(interaction, fallback=channel, limit=limit, user=user)
        elif not isinstance(channel, discord.TextChannel):
            await interaction.edit_original_response(
                content="⚠️ I can open chat threads only in text channels; use /chat in one.", allowed_mentions=NO_MENTIONS)
            return None
        else:
            try:
                if private:
                    thread = await channel.create_thread(name=title, type=discord.ChannelType.private_thread,
                                                         invitable=False, auto_archive_duration=1440)
                    await thread.add_user(user)
                    await interaction.edit_original_response(
                        content=f"🔒 Private chat opened: {thread.mention}", allowed_mentions=NO_MENTIONS)
                    responder = ChannelResponder(thread, limit=limit, ping=user)
                else:
                    starter = await interaction.edit_original_response(
                        content=self._compose(header, "⏳ Queued…"), allowed_mentions=NO_MENTIONS)
                    thread = await starter.create_thread(name=title, auto_archive_duration=1440)
                    responder = InteractionResponder(interaction, fallback=thread, limit=limit, user=user, original=starter)
            except discord.Forbidden:
                await interaction.edit_original_response(
                    content="⚠️ I'm not allowed to create threads here (I need Create Public/Private Threads and "
                            "Send Messages in Threads).", allowed_mentions=NO_MENTIONS)
                return None
        await asyncio.to_thread(
            self.store.add_chat, session.id, thread.id, user.id,
            guild_id=interaction.guild_id, channel_id=getattr(channel, "id", None) if interaction.guild else None,
            private=private,
        )
        self._threads[thread.id] = session.id
        log.info("user %s opened session %s in thread %s", user.id, session.id, thread.id)
        return session.id, thread, responder

    # -------------------------------------------------------------------------------------------- regenerate
    async def regenerate(self, interaction: discord.Interaction, session_id: str, *, reseed: bool,
                         superseded: bool = False, thread_id: int | None = None) -> None:
        user = interaction.user
        record = await asyncio.to_thread(self.store.chat, session_id)
        if record is None:
            return await self._ephemeral(interaction, "I don't know this chat any more.")
        if user.id not in (record.owner_id, record.last_user_id):
            return await self._ephemeral(
                interaction, "Only the person who started this chat, or who asked the last question, can regenerate it.")
        if superseded or self._threads.get(record.thread_id) != session_id:
            return await self._ephemeral(interaction, "Only the latest reply of a chat can be regenerated; this one has been replaced.")
        work = self.engine.work(session_id, regenerate=True, reseed=reseed, settings=self._settings(interaction.guild_id))
        try:
            job = self.queue.submit(user.id, work, label="re-seed" if reseed else "regenerate")
        except QueueRejected as e:
            return await self._ephemeral(interaction, f"⏳ {e}")
        try:
            thread = self.get_channel(record.thread_id) or await self.fetch_channel(record.thread_id)
            limit = self._upload_limit(interaction)
            header = f"{user.mention} {'🎲 re-seeded' if reseed else '🔁 regenerated'} the last reply"
            if interaction.channel_id == thread.id:
                await interaction.response.defer(thinking=True)
                responder: Responder = InteractionResponder(interaction, fallback=thread, limit=limit, user=user)
            else:  # a button on the thread's starter message: answer inside the thread
                await interaction.response.defer()
                responder = ChannelResponder(thread, limit=limit, ping=user)
        except BaseException:
            self.queue.cancel(job.id)
            raise
        await self._follow(job, responder, header=header, thread_id=thread.id, user_id=user.id)

    # -------------------------------------------------------------------------------------------- buttons
    async def on_reply_button(self, interaction: discord.Interaction, action: str, key: str) -> None:
        problem = self.access_problem(interaction.user, interaction.guild, interaction.channel)
        if problem:
            return await self._ephemeral(interaction, problem)
        record = await asyncio.to_thread(self.store.reply, key)
        if record is None:
            return await self._ephemeral(interaction, "I no longer know this reply.")
        if action == "info":
            turn = await asyncio.to_thread(self._saved_turn, record.session_id, record.turn_index)
            if turn is None:
                return await self._ephemeral(interaction, "I no longer know this reply.")
            return await self._ephemeral(interaction, format_info(turn))
        await self.regenerate(interaction, record.session_id, reseed=action == "reseed", superseded=record.superseded)

    def _saved_turn(self, session_id: str, index: int):
        """A reply as its session saved it (None when it is gone: replaced, or the session deleted)."""
        from memory import SessionNotFound

        try:
            turns = self.engine.memory.turns(session_id)
        except SessionNotFound:
            return None
        return next((t for t in turns if t.index == index and t.role == "assistant"), None)

    async def on_cancel_button(self, interaction: discord.Interaction, job_id: int) -> None:
        if self.queue.cancel(job_id, interaction.user.id):
            await interaction.response.defer()  # the job's own status edit shows "Cancelled"
            return
        await self._ephemeral(interaction, "Only the person who asked can cancel this, and only while it is still queued.")

    # -------------------------------------------------------------------------------------------- /reset /history /settings
    async def reset(self, interaction: discord.Interaction) -> None:
        thread_id = interaction.channel_id
        session_id = self._threads.get(thread_id)
        if session_id is None:
            return await self._ephemeral(interaction, "Use /reset inside one of my chat threads.")
        record = await asyncio.to_thread(self.store.chat, session_id)
        if record is not None and interaction.user.id != record.owner_id:
            return await self._ephemeral(interaction, "Only the person who started this chat can reset it.")
        session = await asyncio.to_thread(self.engine.new_session, None)
        await asyncio.to_thread(
            self.store.add_chat, session.id, thread_id, interaction.user.id, guild_id=interaction.guild_id,
            channel_id=record.channel_id if record else None, private=record.private if record else False,
        )
        await asyncio.to_thread(self.store.supersede, session_id)
        self._threads[thread_id] = session.id
        await interaction.response.send_message(
            "🧹 Fresh start: I've forgotten this thread's conversation (it is still listed in /history).",
            allowed_mentions=NO_MENTIONS)

    async def history(self, interaction: discord.Interaction) -> None:
        from memory import SessionNotFound

        records = await asyncio.to_thread(self.store.chats_of, interaction.user.id, guild_id=interaction.guild_id)

        def describe():
            lines = []
            for r in records:
                try:
                    s = self.engine.session(r.session_id)
                except SessionNotFound:
                    continue
                if s.turn_count == 0:  # cancelled before it ran: nothing to come back to
                    continue
                current = self._threads.get(r.thread_id) == r.session_id
                when = int(s.updated_at.replace(tzinfo=s.updated_at.tzinfo or timezone.utc).timestamp())
                lines.append(
                    f"{'🔒' if r.private else '💬'} <#{r.thread_id}> — {_clip(_one_line(s.title or '(untitled)'), 60)} · "
                    f"{s.turn_count} turns · <t:{when}:R> · `{s.id}`{'' if current else ' (reset)'}"
                )
            return lines

        lines = await asyncio.to_thread(describe)
        if not lines:
            return await self._ephemeral(interaction, "You have no chats here yet; start one with /chat.")
        out = "**Your chats** (only you see this list)\n"
        for line in lines:
            if len(out) + len(line) + 1 > MAX_CONTENT:
                break
            out += line + "\n"
        await self._ephemeral(interaction, out.rstrip())

    async def server_settings(self, interaction: discord.Interaction, key: str | None, value: str | None) -> None:
        if interaction.guild_id is None:
            return await self._ephemeral(interaction, "Server settings exist only in servers.")
        if not interaction.permissions.manage_guild:
            return await self._ephemeral(interaction, "Only members with the Manage Server permission can change these.")
        if key is None or value is None:
            current = self._settings(interaction.guild_id)
            shown = "\n".join(f"• `{k}` = `{'profile default' if getattr(current, k) is None else getattr(current, k)}`"
                              for k in ChatSettings.names())
            hint = "" if key is None else f"\nGive a value to set `{key}`."
            return await self._ephemeral(interaction, f"**Server defaults**\n{shown}{hint}")
        probe = ChatSettings()
        try:
            probe.set(key, value)  # the same parsing as the chat's /set (seeds, on/off, ranges)
        except ValueError as e:
            return await self._ephemeral(interaction, f"⚠️ {e}")
        new = getattr(probe, key)
        await asyncio.to_thread(self.store.set_guild_setting, interaction.guild_id, key, new)
        shown = "the profile default" if new is None else f"`{new}`"
        log.info("guild %s: %s set %s=%s", interaction.guild_id, interaction.user.id, key, new)
        await self._ephemeral(interaction, f"✅ Server default `{key}` is now {shown}.")

    # -------------------------------------------------------------------------------------------- plain messages
    async def on_message(self, message: discord.Message) -> None:
        if message.author.bot or message.webhook_id is not None or self.user is None:
            return
        if message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return
        channel = message.channel
        session_id = self._threads.get(channel.id)
        dm = message.guild is None
        mentioned = not dm and self.user in message.mentions
        if session_id is None and not mentioned and not dm:
            return  # not for us
        if self.access_problem(message.author, message.guild, channel):
            return  # ignored: not enabled here (silently, as for any message not meant for us)
        text = re.sub(rf"<@!?{self.user.id}>", "", message.content).strip()
        attachments = [a for a in message.attachments]
        if not text and not attachments:
            return
        # access (above) → limits → download: a user over a limit costs no download or decoding
        if len(attachments) > self.config.max_attachments:
            await self._reply_notice(message, f"⚠️ {len(attachments)} attachments; I take at most "
                                              f"{self.config.max_attachments} per message.")  # fmt: skip
            return

        async def prepare(folder: Path) -> Intake | None:
            for a in attachments:
                if problem := self._precheck(a):
                    await self._reply_notice(message, problem)
                    return None
            staged = []
            for a in attachments:
                try:
                    staged.append(await self._fetch(a, folder))
                except AttachmentRejected as e:
                    await self._reply_notice(message, str(e))
                    return None
            thread, sid = channel, session_id
            if sid is None:
                if not dm and not isinstance(channel, discord.TextChannel):
                    await self._reply_notice(message, "I can open chat threads only in text channels; use /chat in one.")
                    return None
                session = await asyncio.to_thread(self.engine.new_session, _clip(_one_line(text), 60) or None)
                if not dm:
                    try:
                        thread = await message.create_thread(name=_clip(_one_line(text), 90) or "chat", auto_archive_duration=1440)
                    except discord.Forbidden:
                        await self._reply_notice(message, "I'm not allowed to create threads here.")
                        return None
                await asyncio.to_thread(
                    self.store.add_chat, session.id, thread.id, message.author.id, guild_id=message.guild and message.guild.id,
                    channel_id=None if dm else channel.id,
                )
                self._threads[thread.id] = session.id
                sid = session.id
            responder = ChannelResponder(thread, limit=limit, reference=message if thread is channel else None)
            return Intake(sid, thread, responder, staged)

        async def reject(content: str) -> None:
            await self._reply_notice(message, content)

        limit = self._upload_limit(guild=message.guild)
        await self._intake(message.author.id, label="message", text=text, want=[], guild_id=message.guild and message.guild.id,
                           overrides=None, prepare=prepare, reject=reject)

    async def _reply_notice(self, message: discord.Message, content: str) -> None:
        try:
            await message.reply(content, allowed_mentions=NO_MENTIONS, mention_author=False)
        except discord.HTTPException as e:
            log.warning("could not reply: %s %s", e.status, e.text)


@dataclass
class Intake:
    """Where a request's turn runs and its reply goes (what a front end's `prepare` found out)."""

    session_id: str
    thread: Any
    responder: Responder
    attachments: list = field(default_factory=list)  # (modality, path), checked
    header: str = ""


def _not_prepared(job: Job):
    raise RuntimeError("a job released before its request was prepared")


def _wait_quietly(job: Job, timeout: float | None = None) -> None:
    try:
        job.future.result(timeout)
    except BaseException:
        pass
