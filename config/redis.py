"""How to reach one Redis instance (the broker's or the state's): every URL form, Sentinel, TLS,
timeouts, checked when settings are built so a wrong form stops the process at start-up.

In the spirit of arq's ``RedisSettings``; workers/redis_clients.py turns it into clients, pools
and kombu's connection options, and nothing else builds a Redis client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import parse_qsl, unquote, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationInfo,
    model_validator,
)

from config.destination_base import ConfigError

RedisForm = Literal["redis", "rediss", "unix", "sentinel"]
FORMS: tuple[RedisForm, ...] = ("redis", "rediss", "unix", "sentinel")
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
TLS_FIELDS = ("tls_ca_file", "tls_cert_file", "tls_key_file")


class RedisConfigError(ConfigError):
    """A Redis instance's settings are unsupported or inconsistent; the message names the
    setting (its environment variable when built from the environment) and the rule. Not a
    ValueError on purpose: pydantic would wrap it with the whole input, URL password included."""


def masked_url(url: str) -> str:
    """``url`` with the password of its userinfo replaced by ``***`` and its query's values
    left out (a query is refused, and may hold one too): safe to show."""
    url, question, query = url.partition("?")
    if question:
        url += "?" + "&".join(f"{pair.partition('=')[0]}=..." for pair in query.split("&"))
    scheme, sep, rest = url.rpartition("://")
    if "@" not in rest:
        return url
    userinfo, _, hosts = rest.rpartition("@")
    user, colon, _password = userinfo.partition(":")
    return f"{scheme}{sep}{user}{':***' if colon else ''}@{hosts}"


class RedisSettings(BaseModel):
    """One Redis instance. ``url`` forms:

    - ``redis://[[user]:password@]host[:port][/db]`` and ``rediss://...`` (TLS)
    - ``unix://[[user]:password@]/path/to/redis.sock[?db=N]``
    - ``sentinel://[[user]:password@]host[:port][,host[:port]...][/db]`` with
      ``sentinel_master``; the userinfo is the data nodes' (master's and replicas') password,
      ``sentinel_password`` the sentinels' own.

    No query parameters (besides unix's ``db``): each option has its own field, so nothing can
    be set twice in two ways (``?ssl_cert_reqs=none`` is ``tls_verify=False``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = "redis://127.0.0.1:6379/0"
    sentinel_master: str | None = None
    sentinel_password: SecretStr | None = None
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_verify: bool = True
    socket_timeout: float = Field(default=10.0, gt=0)
    connect_timeout: float = Field(default=5.0, gt=0)

    _hosts: tuple[tuple[str, int], ...] = PrivateAttr(())
    _db: int = PrivateAttr(0)
    _username: str | None = PrivateAttr(None)
    _password: SecretStr | None = PrivateAttr(None)
    _path: str | None = PrivateAttr(None)
    _env_prefix: str | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> Self:
        # Field names become environment variables when Settings builds this (its context).
        self._env_prefix = (info.context or {}).get("env_prefix") if info else None
        name = self.setting_name
        try:
            self._parse_url()
        except ValueError as exc:
            raise RedisConfigError(f"{name('url')}: {exc} (got {masked_url(self.url)})") from None
        problems = self._inconsistencies()
        if problems:
            raise RedisConfigError("; ".join(f"{name(field)}: {rule}" for field, rule in problems))
        return self

    def _parse_url(self) -> None:
        scheme, sep, _ = self.url.partition("://")
        if not sep or scheme not in FORMS:
            raise ValueError(
                f"unsupported URL form {f'{scheme}://' if sep else 'without a scheme'!r}; "
                "use redis://, rediss://, unix:// or sentinel://"
            )
        if scheme == "sentinel":
            self._parse_sentinel()
            return
        parts = urlsplit(self.url)
        self._username = unquote(parts.username) if parts.username else None
        self._password = SecretStr(unquote(parts.password)) if parts.password else None
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        if scheme == "unix":
            if parts.hostname or not parts.path.strip("/"):
                raise ValueError("a unix URL is unix:///path/to/redis.sock[?db=N]")
            self._path = unquote(parts.path)
            db = query.pop("db", "0")
        else:
            if not parts.hostname:
                raise ValueError(f"{scheme}:// needs a host")
            port = parts.port or DEFAULT_PORT  # parts.port raises on a bad one
            self._hosts = ((parts.hostname, port),)
            db = parts.path.strip("/") or "0"
        if query or (scheme != "unix" and parts.query):
            raise ValueError(
                f"query parameters ({', '.join(sorted(query)) or '?'}) are not read; "
                "each option has its own setting (e.g. _TLS_VERIFY, _SOCKET_TIMEOUT)"
            )
        self._db = _database(db)

    def _parse_sentinel(self) -> None:
        rest = self.url.partition("://")[2]
        if "?" in rest:
            raise ValueError("query parameters are not read; use the _SENTINEL_* settings")
        userinfo, at, rest = rest.rpartition("@")
        if at:
            user, _, password = userinfo.partition(":")
            self._username = unquote(user) or None
            self._password = SecretStr(unquote(password)) if password else None
        hostlist, _, db = rest.partition("/")
        if ";" in hostlist:
            raise ValueError("separate sentinels with commas: sentinel://h1:26379,h2:26379/0")
        hosts = []
        for address in hostlist.split(","):
            parts = urlsplit(f"//{address}")
            if not parts.hostname:
                raise ValueError("sentinel:// needs host[:port][,host[:port]...]")
            hosts.append((parts.hostname, parts.port or DEFAULT_SENTINEL_PORT))
        self._hosts = tuple(hosts)
        self._db = _database(db or "0")

    def _inconsistencies(self) -> list[tuple[str, str]]:
        form = self.form
        problems: list[tuple[str, str]] = []
        if form == "sentinel" and not self.sentinel_master:
            problems.append(("sentinel_master", "required with a sentinel:// URL"))
        for field in ("sentinel_master", "sentinel_password"):
            if form != "sentinel" and getattr(self, field) is not None:
                problems.append((field, f"only read with a sentinel:// URL, not {form}://"))
        for field in TLS_FIELDS:
            path: Path | None = getattr(self, field)
            if path is None:
                continue
            if form != "rediss":
                problems.append((field, f"only read with a rediss:// URL, not {form}://"))
            elif not path.is_file():
                problems.append((field, f"{path} is not a readable file"))
        if not self.tls_verify and form != "rediss":
            problems.append(("tls_verify", f"only read with a rediss:// URL, not {form}://"))
        if self.tls_key_file is not None and self.tls_cert_file is None:
            problems.append(("tls_key_file", "a client key needs its certificate (_TLS_CERT_FILE)"))
        if self.tls_ca_file is not None and not self.tls_verify:
            problems.append(
                ("tls_ca_file", "a CA is only used to verify the server: unset it or verify")
            )
        return problems

    def setting_name(self, field: str) -> str:
        """How a user sets ``field``: its environment variable when built from the environment
        (POSTBACK_RELAY_REDIS_TLS_CA_FILE, POSTBACK_RELAY_STATE_REDIS_...), else its name."""
        return f"{self._env_prefix}{field.upper()}" if self._env_prefix else field

    @property
    def form(self) -> RedisForm:
        scheme = self.url.partition("://")[0]
        assert scheme in FORMS  # checked at validation
        return scheme

    @property
    def hosts(self) -> tuple[tuple[str, int], ...]:
        """(host, port) of the server, or of each sentinel; empty for a unix socket."""
        return self._hosts

    @property
    def db(self) -> int:
        return self._db

    @property
    def username(self) -> str | None:
        return self._username

    @property
    def password(self) -> SecretStr | None:
        """The data node's password (the master's and replicas' with Sentinel)."""
        return self._password

    @property
    def socket_path(self) -> str | None:
        return self._path

    def describe(self) -> str:
        """What an operator needs to know which instance this is; never a password."""
        user = f"{self._username}@" if self._username else ""
        if self.form == "unix":
            return f"unix://{user}{self._path}?db={self._db}"
        hosts = ",".join(_host_port(host, port) for host, port in self._hosts)
        text = f"{self.form}://{user}{hosts}/{self._db}"
        if self.form == "sentinel":
            text += f" (master {self.sentinel_master})"
        elif self.form == "rediss":
            verify = "off" if not self.tls_verify else f"CA {self.tls_ca_file or 'system'}"
            cert = f", client cert {self.tls_cert_file}" if self.tls_cert_file else ""
            text += f" (TLS, verify {verify}{cert})"
        return text

    def __json__(self) -> str:
        """Celery JSON-encodes transport options in a worker's stats reply (Flower asks)."""
        return self.describe()

    def __repr_args__(self) -> Any:
        for key, value in super().__repr_args__():
            yield key, (masked_url(value) if key == "url" else value)


def _database(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"the database must be a number >= 0, not {text[:20]!r}")
    return int(text)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
