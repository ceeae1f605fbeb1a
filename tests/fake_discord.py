"""An in-process fake of Discord for tests: REST API, gateway websocket and CDN on 127.0.0.1.

discord.py runs unmodified against it: its own HTTP client, rate-limit buckets, multipart uploads,
webhook adapter (interaction responses), gateway handshake (HELLO → IDENTIFY → READY →
GUILD_CREATE) and event parsers. `patched()` points discord.py at this server (`Route.BASE`,
`DiscordWebSocket.DEFAULT_GATEWAY`); nothing of the code under test is replaced.

The server keeps Discord's documented contract, not the bot's assumptions; each rule cites the
Discord developer documentation (https://discord.com/developers/docs/...) where it is enforced:
- the bot token in the Authorization header (401 otherwise);
- a message's content is at most 2000 characters, an embed description 4096, a message has at
  most 10 embeds, 10 attachments and 5 rows of 5 buttons (400, code 50035 "Invalid Form Body",
  with Discord's nested `errors` object);
- the files of one message together fit the upload limit: the guild's (by boost tier) for bot
  messages, the interaction's `attachment_size_limit` for interaction responses (413, code 40005
  "Request entity too large");
- an empty message is refused (400, code 50006);
- rate limits: with `rate_limit = (n, seconds)` every route (method, path template, major
  parameter) takes n requests per window and answers 429 with `retry_after`, as discord.py expects
  it (JSON body, `Via` header), so discord.py's own retry path runs; `throttled` lists them;
- an interaction must be acknowledged within 3 s (404, code 10062 otherwise) and only once (400,
  code 40060); its token works for 15 minutes (401, code 50027 after; `expire()` ends it early);
- thread ids equal their starter message's id; a THREAD_CREATE / MESSAGE_CREATE event follows the
  REST call that made it. `upload(..., delay=s)` makes the CDN slow to serve an attachment.

It all runs on one event loop in a background thread; the test thread drives it with the
synchronous methods (`slash`, `click`, `say`, `wait`, ...), which run on that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import mimetypes
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import aiohttp
from aiohttp import web

DISCORD_EPOCH_MS = 1420070400000
EPHEMERAL = 64
LOADING = 128
OPTION_TYPES = {3: str, 4: int, 5: bool, 10: float, 11: "attachment"}
MANAGE_GUILD = 1 << 5
ALL_PERMISSIONS = (1 << 50) - 1

DOCS = "https://discord.com/developers/docs"
# https://discord.com/developers/docs/resources/message#create-message-jsonform-params
# ("content: Message contents (up to 2000 characters)"; "embeds: Up to 10 rich embeds")
MAX_CONTENT = 2000
MAX_EMBEDS = 10
# https://discord.com/developers/docs/resources/message#embed-object-embed-limits
# (title 256, description 4096, all embeds of a message together 6000 characters)
MAX_EMBED_TITLE, MAX_EMBED_DESCRIPTION, MAX_EMBED_TOTAL = 256, 4096, 6000
# https://discord.com/developers/docs/reference#uploading-files ("up to 10 files" per message)
MAX_ATTACHMENTS = 10
# https://discord.com/developers/docs/components/reference#action-row (5 rows, 5 buttons each;
# custom_id at most 100 characters, a button label at most 80)
MAX_ROWS, MAX_ROW_ITEMS, MAX_CUSTOM_ID, MAX_LABEL = 5, 5, 100, 80
# the upload limit by boost tier (https://discord.com/developers/docs/resources/guild#guild-object-premium-tier;
# the same table as discord.py's Guild.filesize_limit): 10 MiB unboosted, 50 MiB tier 2, 100 MiB tier 3
GUILD_UPLOAD_LIMIT = {0: 10 * 2**20, 1: 10 * 2**20, 2: 50 * 2**20, 3: 100 * 2**20}
# https://discord.com/developers/docs/interactions/receiving-and-responding#responding-to-an-interaction
# ("you must send an initial response within 3 seconds"; "tokens are valid for 15 minutes")
ACK_DEADLINE_S = 3.0
TOKEN_LIFE_S = 15 * 60

_counter = itertools.count(1)


def snowflake(at: float | None = None) -> int:
    ms = int((time.time() if at is None else at) * 1000)
    return ((ms - DISCORD_EPOCH_MS) << 22) | (next(_counter) & 0x3FFFFF)


def iso(at: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if at is None else at, timezone.utc).isoformat()


@dataclass
class InteractionRecord:
    id: int
    token: str
    type: int
    user_id: int
    channel_id: int
    guild_id: int | None
    payload: dict
    created: float = field(default_factory=time.time)
    acked_at: float | None = None
    callback_type: int | None = None
    original_id: int | None = None
    followups: list[int] = field(default_factory=list)
    expired: bool = False


@dataclass
class RequestRecord:
    method: str
    path: str
    json: Any
    files: list[tuple[str, bytes]]
    headers: dict
    at: float


class FakeDiscord:
    def __init__(self, token: str | None = None):
        # shaped like a real token (base64 id . timestamp . hmac); never a real one
        self.token = token or f"MTI{secrets.token_urlsafe(21)}.{secrets.token_urlsafe(4)}.{secrets.token_urlsafe(27)}"
        self.app_id = snowflake()
        self.bot_user = self._user_payload(self.app_id, "nextgpt", bot=True)
        self.users: dict[int, dict] = {self.app_id: self.bot_user}
        self.guilds: dict[int, dict] = {}
        self.members: dict[tuple[int, int], dict] = {}  # (guild, user) → member payload
        self.permissions: dict[tuple[int, int], int] = {}
        self.channels: dict[int, dict] = {}
        self.messages: dict[int, dict] = {}
        self.deleted: set[int] = set()
        self.message_log: dict[int, list[dict]] = {}  # message id → every version (create + edits)
        self.interactions: dict[str, InteractionRecord] = {}
        self.commands: dict[str, list[dict]] = {}  # "global" or guild id → registered commands
        self.thread_members: dict[int, set[int]] = {}
        self.cdn: dict[str, tuple[bytes, str]] = {}
        self.requests: list[RequestRecord] = []
        self.unknown: list[str] = []
        self.identify: dict | None = None
        self.ready = threading.Event()
        self.upload_limit = 10 * 2**20  # `attachment_size_limit` sent with interactions (and enforced on their responses)
        self.rate_limit: tuple[int, float] | None = None  # (requests, per seconds) for every route; None: unlimited
        self.throttled: list[str] = []  # "METHOD path" of every request answered 429
        self.rejected: list[tuple[str, int, int]] = []  # ("METHOD path", status, code) of every error answer
        self._buckets: dict[tuple, list[float]] = {}  # route key → [window end, requests in the window]
        self.cdn_delay: dict[str, float] = {}  # CDN path → seconds before it answers
        self._ws: web.WebSocketResponse | None = None
        self._seq = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    # ---------------------------------------------------------------------------------------- lifecycle
    def start(self) -> "FakeDiscord":
        started = threading.Event()

        def main():
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self._serve())
            started.set()
            self.loop.run_forever()
            self.loop.run_until_complete(self._runner.cleanup())
            self.loop.close()

        self._thread = threading.Thread(target=main, name="fake-discord", daemon=True)
        self._thread.start()
        started.wait(10)
        return self

    def stop(self) -> None:
        if self.loop is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    async def _serve(self) -> None:
        app = web.Application(client_max_size=200 * 2**20)
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/gateway/", self._gateway)
        app.router.add_get("/cdn/{path:.*}", self._cdn)
        app.router.add_route("*", "/api/v10/{path:.*}", self._rest)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @contextlib.contextmanager
    def patched(self):
        """Point discord.py at this server for the duration."""
        import discord.gateway
        import discord.http
        import yarl

        saved = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
        discord.http.Route.BASE = f"{self.base}/api/v10"
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(f"ws://127.0.0.1:{self.port}/gateway")
        try:
            yield self
        finally:
            discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = saved

    def call(self, fn: Callable[[], Any], timeout: float = 30) -> Any:
        """Run `fn()` (or await it, if it returns a coroutine) on the server's loop; return its result."""

        async def wrapper():
            out = fn()
            if asyncio.iscoroutine(out):
                out = await out
            return out

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(timeout)

    def spawn(self, coro) -> "asyncio.Future":
        """Start a coroutine on the server's loop (e.g. a discord.py client) without waiting."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def wait(self, predicate: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
        """Poll `predicate` (evaluated on the server's loop) until truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.call(predicate)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.05)

    # ---------------------------------------------------------------------------------------- world
    @staticmethod
    def _user_payload(uid: int, name: str, bot: bool = False) -> dict:
        return {"id": str(uid), "username": name, "global_name": name.title(), "discriminator": "0",
                "avatar": None, "bot": bot, "public_flags": 0, "flags": 0}

    def add_guild(self, name: str = "Test Server", premium_tier: int = 0) -> int:
        gid = snowflake()
        everyone = {"id": str(gid), "name": "@everyone", "permissions": str(ALL_PERMISSIONS & ~MANAGE_GUILD),
                    "position": 0, "color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0}
        self.guilds[gid] = {
            "id": str(gid), "name": name, "icon": None, "owner_id": str(self.app_id), "roles": [everyone],
            "emojis": [], "stickers": [], "features": [], "premium_tier": premium_tier, "member_count": 1,
            "large": False, "unavailable": False, "joined_at": iso(), "system_channel_id": None,
            "afk_channel_id": None, "afk_timeout": 300, "verification_level": 0, "default_message_notifications": 0,
            "explicit_content_filter": 0, "mfa_level": 0, "nsfw_level": 0, "preferred_locale": "en-US",
            "premium_subscription_count": 0, "max_members": 500000, "vanity_url_code": None, "description": None,
            "banner": None, "splash": None, "discovery_splash": None, "application_id": None,
            "system_channel_flags": 0, "rules_channel_id": None, "public_updates_channel_id": None,
            "channels": [], "threads": [], "members": [], "voice_states": [], "presences": [],
            "stage_instances": [], "guild_scheduled_events": [], "soundboard_sounds": [],
        }
        self._add_member(gid, self.app_id, [], ALL_PERMISSIONS)
        return gid

    def add_role(self, guild_id: int, name: str) -> int:
        rid = snowflake()
        roles = self.guilds[guild_id]["roles"]
        roles.append({"id": str(rid), "name": name, "permissions": "0", "position": len(roles), "color": 0,
                      "hoist": False, "managed": False, "mentionable": True, "flags": 0})
        return rid

    def add_channel(self, guild_id: int, name: str) -> int:
        cid = snowflake()
        ch = {"id": str(cid), "type": 0, "guild_id": str(guild_id), "name": name, "position": len(self.guilds[guild_id]["channels"]),
              "permission_overwrites": [], "nsfw": False, "parent_id": None, "topic": None, "last_message_id": None,
              "rate_limit_per_user": 0, "flags": 0}
        self.channels[cid] = ch
        self.guilds[guild_id]["channels"].append({k: v for k, v in ch.items() if k != "guild_id"})
        return cid

    def add_user(self, name: str, guild_id: int | None = None, *, roles: list[int] = (), permissions: int | None = None) -> int:
        uid = snowflake()
        self.users[uid] = self._user_payload(uid, name)
        if guild_id is not None:
            perms = (ALL_PERMISSIONS & ~MANAGE_GUILD) if permissions is None else permissions
            self._add_member(guild_id, uid, list(roles), perms)
        return uid

    def _add_member(self, gid: int, uid: int, roles: list[int], perms: int) -> None:
        member = {"user": self.users[uid], "roles": [str(r) for r in roles], "joined_at": iso(), "deaf": False,
                  "mute": False, "flags": 0, "nick": None, "avatar": None, "premium_since": None, "pending": False,
                  "communication_disabled_until": None}
        self.members[(gid, uid)] = member
        self.permissions[(gid, uid)] = perms
        if uid == self.app_id:
            self.guilds[gid]["members"].append(member)

    def dm_channel(self, user_id: int) -> int:
        for cid, ch in self.channels.items():
            if ch["type"] == 1 and ch["recipients"][0]["id"] == str(user_id):
                return cid
        cid = snowflake()
        self.channels[cid] = {"id": str(cid), "type": 1, "recipients": [self.users[user_id]], "last_message_id": None, "flags": 0}
        return cid

    def upload(self, filename: str, data: bytes, content_type: str | None = None, *,
               width: int | None = None, height: int | None = None, size: int | None = None,
               delay: float = 0.0) -> dict:
        """A user's attachment, served by the CDN (after `delay` seconds). `size` may lie (as a client could)."""
        aid = snowflake()
        path = f"attachments/{aid}/{filename}"
        self.cdn[path] = (data, content_type or "application/octet-stream")
        if delay:
            self.cdn_delay[path] = delay
        att = {"id": str(aid), "filename": filename, "size": len(data) if size is None else size,
               "url": f"{self.base}/cdn/{path}", "proxy_url": f"{self.base}/cdn/{path}"}
        if content_type:
            att["content_type"] = content_type
        if width is not None:
            att["width"], att["height"] = width, height
        return att

    # ---------------------------------------------------------------------------------------- queries
    def command(self, name: str) -> dict:
        for scope in self.commands.values():
            for c in scope:
                if c["name"] == name:
                    return c
        raise KeyError(f"command /{name} was not registered (registered: {self.command_names()})")

    def command_names(self) -> list[str]:
        return sorted({c["name"] for scope in self.commands.values() for c in scope})

    def original(self, itx: InteractionRecord) -> dict | None:
        if itx.original_id is None or itx.original_id in self.deleted:
            return None
        return self.messages.get(itx.original_id)

    def channel_messages(self, channel_id: int) -> list[dict]:
        return [m for mid, m in sorted(self.messages.items()) if m["channel_id"] == str(channel_id) and mid not in self.deleted]

    def versions(self, message_id: int) -> list[dict]:
        return self.message_log.get(int(message_id), [])

    def threads(self) -> list[dict]:
        return [c for c in self.channels.values() if c["type"] in (11, 12)]

    def expire(self, itx: InteractionRecord) -> None:
        """End an interaction token now, as Discord does after 15 minutes."""
        itx.expired = True

    # ---------------------------------------------------------------------------------------- gateway events
    def dispatch(self, event: str, data: dict) -> None:
        self.call(lambda: self._dispatch(event, data))

    async def _dispatch(self, event: str, data: dict) -> None:
        if self._ws is None or self._ws.closed:
            return
        self._seq += 1
        await self._ws.send_str(json.dumps({"op": 0, "t": event, "s": self._seq, "d": data}))

    def close_gateway(self, code: int) -> None:
        async def close():
            if self._ws is not None:
                await self._ws.close(code=code, message=b"closed by the test")
        self.call(close)

    def _member_for_interaction(self, guild_id: int, user_id: int) -> dict:
        m = dict(self.members[(guild_id, user_id)])
        m["permissions"] = str(self.permissions[(guild_id, user_id)])
        return m

    def _interaction(self, user_id: int, channel_id: int, itype: int, data: dict, message: dict | None = None,
                     created: float | None = None) -> InteractionRecord:
        ch = self.channels[channel_id]
        guild_id = int(ch["guild_id"]) if ch.get("guild_id") else None
        iid = snowflake(created)
        token = "aW50ZXJhY3Rpb246" + secrets.token_urlsafe(48)
        payload = {
            "id": str(iid), "application_id": str(self.app_id), "type": itype, "token": token, "version": 1,
            "channel_id": str(channel_id), "channel": dict(ch), "data": data, "locale": "en-US",
            "app_permissions": str(ALL_PERMISSIONS), "entitlements": [], "attachment_size_limit": self.upload_limit,
            "context": 0 if guild_id else 1,
            "authorizing_integration_owners": {"0": str(guild_id)} if guild_id else {"1": str(user_id)},
        }
        if guild_id:
            payload["guild_id"] = str(guild_id)
            payload["guild_locale"] = "en-US"
            payload["member"] = self._member_for_interaction(guild_id, user_id)
        else:
            payload["user"] = self.users[user_id]
        if message is not None:
            payload["message"] = message
        rec = InteractionRecord(iid, token, itype, user_id, channel_id, guild_id, payload, created=created or time.time())
        self.interactions[token] = rec
        return rec

    def slash(self, user_id: int, channel_id: int, name: str, *, created: float | None = None, **options) -> InteractionRecord:
        """A user runs /name with options (an attachment option takes a dict from `upload`)."""

        def build():
            cmd = self.command(name)
            known = {o["name"]: o for o in cmd.get("options", [])}
            opts, resolved = [], {}
            for key, value in options.items():
                if value is None:
                    continue
                spec = known.get(key)
                if spec is None:
                    raise KeyError(f"/{name} has no option {key!r} (it has {sorted(known)})")
                if spec["type"] == 11:
                    resolved.setdefault("attachments", {})[value["id"]] = value
                    value = value["id"]
                opts.append({"name": key, "type": spec["type"], "value": value})
            data = {"id": cmd["id"], "name": name, "type": 1, "options": opts}
            if resolved:
                data["resolved"] = resolved
            if cmd.get("guild_id"):
                data["guild_id"] = cmd["guild_id"]
            return self._interaction(user_id, channel_id, 2, data, created=created)

        rec = self.call(build)
        self.dispatch("INTERACTION_CREATE", rec.payload)
        return rec

    def click(self, user_id: int, message_id: int, custom_id: str) -> InteractionRecord:
        def build():
            msg = self.messages[int(message_id)]
            data = {"custom_id": custom_id, "component_type": 2}
            return self._interaction(user_id, int(msg["channel_id"]), 3, data, message=msg)

        rec = self.call(build)
        self.dispatch("INTERACTION_CREATE", rec.payload)
        return rec

    def say(self, user_id: int, channel_id: int, content: str, *, attachments: list[dict] = (), mention_bot: bool = False) -> dict:
        """A user posts a message (MESSAGE_CREATE)."""

        def build():
            ch = self.channels[channel_id]
            text = (f"<@{self.app_id}> " if mention_bot else "") + content
            msg = self._message(channel_id, self.users[user_id], {"content": text}, [], stored_attachments=list(attachments))
            if mention_bot:
                msg["mentions"] = [self.bot_user]
            if ch.get("guild_id"):
                member = {k: v for k, v in self.members[(int(ch["guild_id"]), user_id)].items() if k != "user"}
                msg["member"] = member
            self._store(msg)
            return msg

        msg = self.call(build)
        self.dispatch("MESSAGE_CREATE", msg)
        return msg

    # ---------------------------------------------------------------------------------------- messages
    def _message(self, channel_id: int, author: dict, payload: dict, files: list[tuple[str, bytes, str]], *,
                 flags: int = 0, webhook_id: int | None = None, interaction: InteractionRecord | None = None,
                 stored_attachments: list[dict] | None = None) -> dict:
        ch = self.channels[int(channel_id)]
        mid = snowflake()
        attachments = stored_attachments if stored_attachments is not None else self._attachments(channel_id, payload, files, [])
        msg = {
            "id": str(mid), "channel_id": str(channel_id), "author": author, "content": payload.get("content") or "",
            "timestamp": iso(), "edited_timestamp": None, "tts": False, "mention_everyone": False, "mentions": [],
            "mention_roles": [], "attachments": attachments, "embeds": payload.get("embeds") or [],
            "components": payload.get("components") or [], "pinned": False, "type": 0,
            "flags": flags | (payload.get("flags") or 0),
        }
        if ch.get("guild_id"):
            msg["guild_id"] = ch["guild_id"]
        if webhook_id:
            msg["webhook_id"] = str(webhook_id)
            msg["application_id"] = str(self.app_id)
        if interaction is not None:
            msg["type"] = 20 if interaction.type == 2 else 19 if payload.get("message_reference") else 0
            msg["interaction_metadata"] = {
                "id": str(interaction.id), "type": interaction.type, "user": self.users[interaction.user_id],
                "authorizing_integration_owners": interaction.payload["authorizing_integration_owners"],
            }
        ref = payload.get("message_reference")
        if ref:
            msg["type"] = 19
            msg["message_reference"] = {"message_id": str(ref["message_id"]), "channel_id": str(channel_id),
                                        "guild_id": ch.get("guild_id"), "type": 0}
            ref_msg = self.messages.get(int(ref["message_id"]))
            if ref_msg is not None:
                msg["referenced_message"] = ref_msg
        msg["_allowed_mentions"] = payload.get("allowed_mentions")  # kept aside, stripped before sending
        return msg

    def _attachments(self, channel_id, payload: dict, files: list[tuple[str, bytes, str]], existing: list[dict]) -> list[dict]:
        by_field = {f[0]: f for f in files}
        out = []
        for i, spec in enumerate(payload.get("attachments", []) if "attachments" in payload else [
            {"id": n, "filename": f[3]} for n, f in enumerate(files)]):
            keep = next((a for a in existing if a["id"] == str(spec.get("id"))), None)
            if keep is not None:
                out.append(keep)
                continue
            field = by_field.get(f"files[{spec['id']}]")
            if field is None:
                continue
            data = field[1]
            name = spec.get("filename") or f"file{i}"
            ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
            aid = snowflake()
            path = f"attachments/{channel_id}/{aid}/{name}"
            self.cdn[path] = (data, ctype)
            out.append({"id": str(aid), "filename": name, "size": len(data), "url": f"{self.base}/cdn/{path}",
                        "proxy_url": f"{self.base}/cdn/{path}", "content_type": ctype})
        return out

    def _store(self, msg: dict) -> None:
        mid = int(msg["id"])
        self.messages[mid] = msg
        self.message_log.setdefault(mid, []).append(json.loads(json.dumps(msg)))

    @staticmethod
    def _public(msg: dict) -> dict:
        return {k: v for k, v in msg.items() if not k.startswith("_")}

    def _edit(self, msg: dict, payload: dict, files) -> dict:
        if "content" in payload:
            msg["content"] = payload["content"] or ""
        if "components" in payload:
            msg["components"] = payload["components"] or []
        if "embeds" in payload:
            msg["embeds"] = payload["embeds"] or []
        if "attachments" in payload or files:
            msg["attachments"] = self._attachments(msg["channel_id"], payload, files, msg["attachments"])
        if "flags" in payload and payload["flags"] is not None:
            msg["flags"] = (msg["flags"] & EPHEMERAL) | payload["flags"]
        msg["flags"] &= ~LOADING
        msg["edited_timestamp"] = iso()
        msg["_allowed_mentions"] = payload.get("allowed_mentions")
        self._store(msg)
        return msg

    async def _created(self, msg: dict) -> None:
        """Discord tells the bot about every message in its channels, its own included."""
        if not msg["flags"] & EPHEMERAL:
            await self._dispatch("MESSAGE_CREATE", self._public(msg))

    # ---------------------------------------------------------------------------------------- HTTP
    @staticmethod
    def _json(data: Any, status: int = 200) -> web.Response:
        # exactly "application/json", as Discord sends it (discord.py compares the header verbatim)
        return web.Response(body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json"})

    @classmethod
    def _error(cls, status: int, code: int, message: str) -> web.Response:
        return cls._json({"message": message, "code": code}, status=status)

    @classmethod
    def _invalid(cls, where: str, message: str, code: str = "BASE_TYPE_MAX_LENGTH") -> web.Response:
        """Discord's 400 for a bad field: code 50035 with the field's path in a nested `errors` object
        (https://discord.com/developers/docs/reference#error-messages)."""
        errors: dict = {"_errors": [{"code": code, "message": message}]}
        for part in reversed(where.split(".")):
            errors = {part: errors}
        return cls._json({"message": "Invalid Form Body", "code": 50035, "errors": errors}, status=400)

    def _check_message(self, payload: dict, files: list, *, upload_limit: int, kept: int = 0) -> web.Response | None:
        """The limits Discord puts on one message (create or edit); None when it is acceptable."""
        content = payload.get("content")
        if content is not None and len(content) > MAX_CONTENT:  # resources/message#create-message
            return self._invalid("content", f"Must be {MAX_CONTENT} or fewer in length.")
        embeds = payload.get("embeds") or []
        if len(embeds) > MAX_EMBEDS:  # resources/message#create-message
            return self._invalid("embeds", f"Must be {MAX_EMBEDS} or fewer in length.")
        total = 0
        for i, e in enumerate(embeds):  # resources/message#embed-object-embed-limits
            title, description = e.get("title") or "", e.get("description") or ""
            if len(title) > MAX_EMBED_TITLE:
                return self._invalid(f"embeds.{i}.title", f"Must be {MAX_EMBED_TITLE} or fewer in length.")
            if len(description) > MAX_EMBED_DESCRIPTION:
                return self._invalid(f"embeds.{i}.description", f"Must be {MAX_EMBED_DESCRIPTION} or fewer in length.")
            total += len(title) + len(description) + sum(len(f.get("name", "")) + len(f.get("value", "")) for f in e.get("fields") or [])
        if total > MAX_EMBED_TOTAL:
            return self._invalid("embeds", f"Embed size exceeds maximum size of {MAX_EMBED_TOTAL}", "MAX_EMBED_SIZE_EXCEEDED")
        rows = payload.get("components") or []
        if len(rows) > MAX_ROWS:  # components/reference#action-row
            return self._invalid("components", f"Must be {MAX_ROWS} or fewer in length.")
        for r, row in enumerate(rows):
            items = row.get("components") or []
            if len(items) > MAX_ROW_ITEMS:
                return self._invalid(f"components.{r}.components", f"Must be {MAX_ROW_ITEMS} or fewer in length.")
            for c, item in enumerate(items):
                if len(item.get("custom_id") or "") > MAX_CUSTOM_ID:
                    return self._invalid(f"components.{r}.components.{c}.custom_id", f"Must be {MAX_CUSTOM_ID} or fewer in length.")
                if len(item.get("label") or "") > MAX_LABEL:
                    return self._invalid(f"components.{r}.components.{c}.label", f"Must be {MAX_LABEL} or fewer in length.")
        # reference#uploading-files: at most 10 files on a message (the ones it keeps included)
        attachments = payload["attachments"] if "attachments" in payload else [None] * (kept + len(files))
        if max(len(attachments), len(files)) > MAX_ATTACHMENTS:
            return self._invalid("attachments", f"Must be {MAX_ATTACHMENTS} or fewer in length.")
        # reference#uploading-files: the files of a request together within the upload limit, else
        # 413 with code 40005 (topics/opcodes-and-status-codes#json: "Request entity too large")
        if sum(len(f[1]) for f in files) > upload_limit:
            return self._error(413, 40005, "Request entity too large")
        return None

    def _upload_limit(self, channel_id: int, rec: InteractionRecord | None = None) -> int:
        """An interaction response: the limit sent with the interaction; a bot message: its guild's (by boost tier)."""
        if rec is not None:
            return int(rec.payload["attachment_size_limit"])
        gid = self.channels[int(channel_id)].get("guild_id")
        return GUILD_UPLOAD_LIMIT[self.guilds[int(gid)]["premium_tier"]] if gid else GUILD_UPLOAD_LIMIT[0]

    def _rate_limited(self, method: str, pattern: str, params: dict) -> web.Response | None:
        """429 when this route's budget for the window is spent (topics/rate-limits).

        Buckets are per route and major parameter (channel, guild, webhook + token), as Discord's.
        The body is Discord's (`message`, `retry_after` in seconds, `global`); the `Via` header is
        what discord.py checks to tell Discord's 429 from a Cloudflare ban. Successful answers carry
        no X-RateLimit headers here, so a client cannot pace itself and has to take the 429 and
        retry (as with Discord's shared-scope limits). Interaction callbacks are exempt
        (interactions/receiving-and-responding: not bound to the bot's rate limits).
        """
        if self.rate_limit is None or pattern.endswith("/callback"):
            return None
        limit, per = self.rate_limit
        major = params.get("cid") or params.get("gid") or (params.get("app"), params.get("token"))
        key = (method, pattern, major)
        now = time.monotonic()
        bucket = self._buckets.setdefault(key, [now + per, 0])
        if now >= bucket[0]:
            bucket[:] = [now + per, 0]
        if bucket[1] < limit:
            bucket[1] += 1
            return None
        retry_after = round(bucket[0] - now, 3)
        headers = {"Content-Type": "application/json", "Via": "1.1 google", "Retry-After": str(max(1, int(retry_after + 0.999))),
                   "X-RateLimit-Limit": str(limit), "X-RateLimit-Remaining": "0", "X-RateLimit-Reset-After": str(retry_after),
                   "X-RateLimit-Bucket": f"fake-{abs(hash(key)) % 10**8}", "X-RateLimit-Scope": "shared"}
        body = {"message": "You are being rate limited.", "retry_after": retry_after, "global": False}
        return web.Response(body=json.dumps(body).encode(), status=429, headers=headers)

    async def _body(self, request: web.Request) -> tuple[Any, list[tuple[str, bytes, str]]]:
        if request.content_type.startswith("multipart/"):
            payload, files = {}, []
            reader = await request.multipart()
            async for part in reader:
                if part.name == "payload_json":
                    payload = json.loads(await part.text())
                else:
                    files.append((part.name, bytes(await part.read(decode=False)), part.headers.get("Content-Type", ""),
                                  part.filename or part.name))
            return payload, files
        raw = await request.read()
        return (json.loads(raw) if raw else None), []

    async def _cdn(self, request: web.Request) -> web.Response:
        if delay := self.cdn_delay.get(request.match_info["path"]):
            await asyncio.sleep(delay)
        found = self.cdn.get(request.match_info["path"])
        if found is None:
            return web.Response(status=404, text="not found")
        return web.Response(body=found[0], content_type=found[1].split(";")[0] or "application/octet-stream")

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["path"]
        body, files = await self._body(request)
        self.requests.append(RequestRecord(request.method, path, body, [(f[0], f[1]) for f in files],
                                           dict(request.headers), time.time()))
        for method, pattern, handler, needs_bot_auth in self._routes():
            if method != request.method:
                continue
            m = re.fullmatch(pattern, path)
            if m is None:
                continue
            if needs_bot_auth and request.headers.get("Authorization") != f"Bot {self.token}":
                return self._error(401, 0, "401: Unauthorized")
            limited = self._rate_limited(request.method, pattern, m.groupdict())
            if limited is not None:
                self.throttled.append(f"{request.method} {path}")
                return limited
            out = await handler(request, body or {}, files, **m.groupdict())
            if out is None:
                return web.Response(status=204)
            if isinstance(out, web.StreamResponse):
                if out.status >= 400 and out.body:
                    self.rejected.append((f"{request.method} {path}", out.status, json.loads(out.body).get("code", 0)))
                return out
            return self._json(self._public(out) if isinstance(out, dict) else out)
        self.unknown.append(f"{request.method} {path}")
        return self._error(404, 0, "404: Not Found")

    def _routes(self):
        i, w = r"(?P<app>\d+)/(?P<token>[^/]+)", r"(?P<cid>\d+)"
        return [
            ("GET", r"/users/@me", self._me, True),
            ("GET", r"/oauth2/applications/@me", self._app_info, True),
            ("PUT", r"/applications/(?P<app>\d+)/commands", self._put_commands, True),
            ("PUT", r"/applications/(?P<app>\d+)/guilds/(?P<gid>\d+)/commands", self._put_commands, True),
            ("POST", r"/interactions/(?P<iid>\d+)/(?P<token>[^/]+)/callback", self._callback, False),
            ("GET", rf"/webhooks/{i}/messages/@original", self._get_original, False),
            ("PATCH", rf"/webhooks/{i}/messages/@original", self._edit_original, False),
            ("DELETE", rf"/webhooks/{i}/messages/@original", self._delete_original, False),
            ("POST", rf"/webhooks/{i}", self._followup, False),
            ("PATCH", rf"/webhooks/{i}/messages/(?P<mid>\d+)", self._edit_followup, False),
            ("POST", rf"/channels/{w}/messages", self._create_message, True),
            ("GET", rf"/channels/{w}/messages/(?P<mid>\d+)", self._get_message, True),
            ("PATCH", rf"/channels/{w}/messages/(?P<mid>\d+)", self._edit_message, True),
            ("DELETE", rf"/channels/{w}/messages/(?P<mid>\d+)", self._delete_message, True),
            ("POST", rf"/channels/{w}/messages/(?P<mid>\d+)/threads", self._thread_from_message, True),
            ("POST", rf"/channels/{w}/threads", self._thread_without_message, True),
            ("PUT", rf"/channels/{w}/thread-members/(?P<uid>\d+|@me)", self._add_thread_member, True),
            ("GET", rf"/channels/{w}", self._get_channel, True),
            ("POST", rf"/channels/{w}/typing", self._typing, True),
        ]

    async def _me(self, request, body, files):
        return self.bot_user

    async def _app_info(self, request, body, files):
        return {"id": str(self.app_id), "name": "nextgpt", "icon": None, "description": "", "bot_public": True,
                "bot_require_code_grant": False, "verify_key": "0" * 64, "flags": 1 << 19, "owner": self.bot_user,
                "team": None, "rpc_origins": [], "interactions_endpoint_url": None, "tags": []}

    async def _put_commands(self, request, body, files, app, gid=None):
        if int(app) != self.app_id:
            return self._error(403, 50001, "Missing Access")
        out = []
        for c in body:
            c = dict(c)
            c.setdefault("type", 1)
            c.update(id=str(snowflake()), application_id=str(self.app_id), version=str(snowflake()))
            if gid:
                c["guild_id"] = gid
            perms = c.get("default_member_permissions")
            c["default_member_permissions"] = None if perms is None else str(perms)  # Discord answers with a string
            c.setdefault("nsfw", False)
            out.append(c)
        self.commands[gid or "global"] = out
        return out

    def _itx(self, token: str, *, for_callback: bool = False) -> InteractionRecord | web.Response:
        rec = self.interactions.get(token)
        if rec is None:
            return self._error(404, 10062, "Unknown interaction") if for_callback else self._error(401, 50027, "Invalid Webhook Token")
        if for_callback:  # interactions/receiving-and-responding#responding-to-an-interaction
            if time.time() - rec.created > ACK_DEADLINE_S:
                return self._error(404, 10062, "Unknown interaction")
            if rec.callback_type is not None:  # one initial response per interaction
                return self._error(400, 40060, "Interaction has already been acknowledged.")
        elif rec.expired or time.time() - rec.created > TOKEN_LIFE_S:  # the token lives 15 minutes
            return self._error(401, 50027, "Invalid Webhook Token")
        return rec

    async def _callback(self, request, body, files, iid, token):
        rec = self._itx(token, for_callback=True)
        if isinstance(rec, web.Response):
            return rec
        rtype, data = body.get("type"), body.get("data") or {}
        if rtype in (4, 7) and (bad := self._check_message(data, files, upload_limit=self._upload_limit(rec.channel_id, rec))):
            return bad
        rec.acked_at, rec.callback_type = time.time(), rtype
        resource: dict = {"type": rtype}
        loading = ephemeral = False
        if rtype in (4, 5):
            flags = (data.get("flags") or 0) | (LOADING if rtype == 5 else 0)
            ephemeral, loading = bool(flags & EPHEMERAL), rtype == 5
            msg = self._message(rec.channel_id, self.bot_user, data if rtype == 4 else {}, files, flags=flags,
                                webhook_id=self.app_id, interaction=rec)
            self._store(msg)
            rec.original_id = int(msg["id"])
            resource["message"] = self._public(msg)
            await self._created(msg)
        elif rtype == 7:  # update the component's message
            target = self.messages[int(rec.payload["message"]["id"])]
            self._edit(target, data, files)
            resource["message"] = self._public(target)
        return {"interaction": {"id": str(rec.id), "type": rec.type, "response_message_id": str(rec.original_id) if rec.original_id else None,
                                "response_message_loading": loading, "response_message_ephemeral": ephemeral},
                "resource": resource}

    def _original_or_error(self, token):
        rec = self._itx(token)
        if isinstance(rec, web.Response):
            return rec, None
        msg = self.original(rec)
        if msg is None:
            return rec, self._error(404, 10008, "Unknown Message")
        return rec, msg

    async def _get_original(self, request, body, files, app, token):
        rec, msg = self._original_or_error(token)
        return rec if isinstance(rec, web.Response) else msg

    async def _edit_original(self, request, body, files, app, token):
        rec, msg = self._original_or_error(token)
        if isinstance(rec, web.Response):
            return rec
        if isinstance(msg, web.Response):
            return msg
        if bad := self._check_message(body, files, upload_limit=self._upload_limit(rec.channel_id, rec), kept=len(msg["attachments"])):
            return bad
        return self._edit(msg, body, files)

    async def _delete_original(self, request, body, files, app, token):
        rec, msg = self._original_or_error(token)
        if isinstance(rec, web.Response):
            return rec
        if isinstance(msg, web.Response):
            return msg
        self.deleted.add(int(msg["id"]))
        return None

    async def _followup(self, request, body, files, app, token):
        rec = self._itx(token)
        if isinstance(rec, web.Response):
            return rec
        if bad := self._check_message(body, files, upload_limit=self._upload_limit(rec.channel_id, rec)):
            return bad
        original = self.original(rec)
        if original is not None and original["flags"] & LOADING:  # the first follow-up fills the "thinking" message
            return self._edit(original, body, files)
        msg = self._message(rec.channel_id, self.bot_user, body, files, webhook_id=self.app_id, interaction=rec)
        self._store(msg)
        rec.followups.append(int(msg["id"]))
        await self._created(msg)
        return msg

    async def _edit_followup(self, request, body, files, app, token, mid):
        rec = self._itx(token)
        if isinstance(rec, web.Response):
            return rec
        msg = self.messages.get(int(mid))
        if msg is None or int(mid) in self.deleted:
            return self._error(404, 10008, "Unknown Message")
        if bad := self._check_message(body, files, upload_limit=self._upload_limit(rec.channel_id, rec), kept=len(msg["attachments"])):
            return bad
        return self._edit(msg, body, files)

    async def _create_message(self, request, body, files, cid):
        if int(cid) not in self.channels:
            return self._error(404, 10003, "Unknown Channel")
        if not (body.get("content") or files or body.get("embeds") or body.get("components")):
            return self._error(400, 50006, "Cannot send an empty message")
        if bad := self._check_message(body, files, upload_limit=self._upload_limit(int(cid))):
            return bad
        msg = self._message(int(cid), self.bot_user, body, files)
        self._store(msg)
        await self._created(msg)
        return msg

    async def _get_message(self, request, body, files, cid, mid):
        msg = self.messages.get(int(mid))
        return msg if msg is not None and int(mid) not in self.deleted else self._error(404, 10008, "Unknown Message")

    async def _edit_message(self, request, body, files, cid, mid):
        msg = self.messages.get(int(mid))
        if msg is None or int(mid) in self.deleted:
            return self._error(404, 10008, "Unknown Message")
        if msg["author"]["id"] != str(self.app_id):
            return self._error(403, 50005, "Cannot edit a message authored by another user")
        if bad := self._check_message(body, files, upload_limit=self._upload_limit(int(cid)), kept=len(msg["attachments"])):
            return bad
        return self._edit(msg, body, files)

    async def _delete_message(self, request, body, files, cid, mid):
        self.deleted.add(int(mid))
        return None

    def _thread_payload(self, tid: int, parent: dict, name: str, ttype: int, archive: int) -> dict:
        return {"id": str(tid), "type": ttype, "guild_id": parent["guild_id"], "parent_id": parent["id"], "name": name,
                "owner_id": str(self.app_id), "last_message_id": None, "message_count": 0, "member_count": 1,
                "rate_limit_per_user": 0, "flags": 0, "total_message_sent": 0,
                "thread_metadata": {"archived": False, "auto_archive_duration": archive, "archive_timestamp": iso(),
                                    "locked": False, "invitable": ttype == 11, "create_timestamp": iso()}}

    async def _thread_from_message(self, request, body, files, cid, mid):
        parent = self.channels.get(int(cid))
        msg = self.messages.get(int(mid))
        if parent is None or msg is None or parent["type"] not in (0, 5):
            return self._error(400, 50024, "Cannot execute action on this channel type")
        if int(mid) in self.channels:
            return self._error(400, 160004, "A thread has already been created for this message")
        thread = self._thread_payload(int(mid), parent, body["name"], 11, body.get("auto_archive_duration", 1440))
        self.channels[int(mid)] = thread
        self.thread_members[int(mid)] = {self.app_id}
        msg["thread"] = thread
        await self._dispatch("THREAD_CREATE", dict(thread, newly_created=True))
        return thread

    async def _thread_without_message(self, request, body, files, cid):
        parent = self.channels.get(int(cid))
        if parent is None or parent["type"] not in (0, 5):
            return self._error(400, 50024, "Cannot execute action on this channel type")
        tid = snowflake()
        thread = self._thread_payload(tid, parent, body["name"], body.get("type", 11), body.get("auto_archive_duration", 1440))
        if "invitable" in body:
            thread["thread_metadata"]["invitable"] = body["invitable"]
        self.channels[tid] = thread
        self.thread_members[tid] = {self.app_id}
        await self._dispatch("THREAD_CREATE", dict(thread, newly_created=True))
        return thread

    async def _add_thread_member(self, request, body, files, cid, uid):
        self.thread_members.setdefault(int(cid), set()).add(self.app_id if uid == "@me" else int(uid))
        return None

    async def _get_channel(self, request, body, files, cid):
        ch = self.channels.get(int(cid))
        return ch if ch is not None else self._error(404, 10003, "Unknown Channel")

    async def _typing(self, request, body, files, cid):
        return None

    # ---------------------------------------------------------------------------------------- gateway
    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        await ws.send_json({"op": 10, "d": {"heartbeat_interval": 41250}, "s": None, "t": None})
        async for frame in ws:
            if frame.type != aiohttp.WSMsgType.TEXT:
                continue
            msg = json.loads(frame.data)
            op = msg.get("op")
            if op == 1:
                await ws.send_json({"op": 11, "d": None, "s": None, "t": None})
            elif op == 2:
                if msg["d"].get("token") != self.token:
                    await ws.close(code=4004, message=b"Authentication failed.")
                    break
                self.identify = msg["d"]
                self._ws = ws
                ready = {"v": 10, "user": self.bot_user, "guilds": [{"id": str(g), "unavailable": True} for g in self.guilds],
                         "session_id": secrets.token_hex(16), "resume_gateway_url": f"ws://127.0.0.1:{self.port}/gateway",
                         "application": {"id": str(self.app_id), "flags": 0}, "private_channels": [], "relationships": []}
                await self._dispatch("READY", ready)
                for guild in self.guilds.values():
                    await self._dispatch("GUILD_CREATE", guild)
                self.ready.set()
            elif op == 6:  # resume: not supported, ask for a fresh session
                await ws.send_json({"op": 9, "d": False, "s": None, "t": None})
        return ws
