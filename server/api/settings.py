"""All API settings in one place (environment variables prefixed DROPFLEET_)."""

import ipaddress
import os
import secrets
from functools import cached_property
from logging import getLogger
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dropfleet.fleet.flower_env import PROJECT_ROOT, flower_env
from dropfleet.server.store.store import STATE_DIR_ENV, default_database_url

PLACEHOLDER_TOKEN = "change-me"
logger = getLogger(__name__)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DROPFLEET_", extra="ignore")

    # development: reads may stay open on a published API, CORS and docs for a local front end;
    # tokens are checked the same in both (no placeholder, at least 16 characters).
    environment: Literal["development", "production"] = "production"
    database_url: str = Field(default_factory=default_database_url)
    admin_token: SecretStr | None = None
    # Without an admin token: read it from this file (default: $DROPFLEET_STATE_DIR/admin-token),
    # created with a random token on first start.
    admin_token_file: Path | None = None
    read_access: Literal["open", "token"] = "open"
    # Where callers beyond this machine reach the API, when not where it binds (compose binds 0.0.0.0
    # inside its network and publishes on DROPFLEET_PUBLISH_HOST): see `exposure_problem`.
    published_host: str | None = None
    read_token: SecretStr | None = None
    # With DROPFLEET_READ_ACCESS=token and no read token: read it from this file (default:
    # $DROPFLEET_STATE_DIR/read-token), created with a random token on first start.
    read_token_file: Path | None = None
    max_request_bytes: int = 64 * 1024
    cors_origins: list[str] = []
    # Where runs are started: the Flower app and a connection in $FLWR_HOME/config.toml. No
    # connection: the API serves the store only (routes that need a SuperLink answer 503).
    app_dir: str = str(PROJECT_ROOT)
    flower_connection: str | None = None
    # The operator's app signing key: runs started here are signed with it (fleet/app_signing.py).
    app_signing_key: Path | None = None
    flwr_home: str = str(PROJECT_ROOT / ".flwr")
    event_poll_seconds: float = 0.5
    # Open followers (SSE streams and long-polls) at once; past it a follower gets 503.
    max_followers: int = Field(100, ge=1)
    # One shared `flwr` query per this many seconds, whoever asks (server/api/superlink.py).
    superlink_cache_seconds: float = Field(5.0, ge=0.5)
    # How often live runs are checked against the SuperLink (0: never).
    reconcile_seconds: float = Field(10.0, ge=0)

    @field_validator("read_token", mode="before")
    @classmethod
    def _unset_when_empty(cls, value: object) -> object:
        return None if value == "" else value  # compose passes `${DROPFLEET_READ_TOKEN:-}`

    @model_validator(mode="after")
    def _admin_token_from_file(self) -> "Settings":
        if self.admin_token is None or not self.admin_token.get_secret_value():
            path = self.admin_token_file or Path(os.environ.get(STATE_DIR_ENV, "state")) / "admin-token"
            self.admin_token = SecretStr(read_or_create_token(path))
        return self

    @model_validator(mode="after")
    def _read_token_from_file(self) -> "Settings":
        if self.read_access == "token" and self.read_token is None:
            path = self.read_token_file or Path(os.environ.get(STATE_DIR_ENV, "state")) / "read-token"
            self.read_token = SecretStr(read_or_create_token(path))
        return self

    @model_validator(mode="after")
    def _no_placeholder_secrets(self) -> "Settings":
        for name, secret in (("admin_token", self.admin_token), ("read_token", self.read_token)):
            if secret is not None and (
                secret.get_secret_value() == PLACEHOLDER_TOKEN or len(secret.get_secret_value()) < 16
            ):
                raise ValueError(
                    f"DROPFLEET_{name.upper()} is a placeholder or shorter than 16 characters; set a "
                    "real secret, or leave DROPFLEET_ADMIN_TOKEN unset for a random one in a file"
                )
        return self

    def exposure_problem(self, bind_host: str) -> str | None:
        """Why the API must not serve on `bind_host`, if it must not: beyond loopback, outside
        development, every read needs a token too."""
        exposed = self.published_host or bind_host
        if is_loopback(exposed) or self.environment == "development" or self.read_access == "token":
            return None
        return (
            f"the API would be reachable on {exposed} with open reads; set DROPFLEET_READ_ACCESS=token "
            "(the read token: DROPFLEET_READ_TOKEN, or a random one in a file), bind 127.0.0.1, or "
            "set DROPFLEET_ENVIRONMENT=development"
        )

    @property
    def admin(self) -> str:
        assert self.admin_token is not None  # set by the validator above
        return self.admin_token.get_secret_value()

    @cached_property
    def flower_env(self) -> dict[str, str]:
        """Environment for `flwr` calls: offline-safe, with this deployment's FLWR_HOME."""
        return flower_env(Path(self.flwr_home))


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost; a name is assumed reachable from elsewhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: assume it is reachable


def read_or_create_token(path: Path) -> str:
    """The token in `path`, or a new random one written there (mode 0600) on first use."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32))
        logger.warning("Created a random token in %s", path)
    info = path.stat()
    if info.st_mode & 0o077 or info.st_uid != os.geteuid():
        raise ValueError(f"the token file {path} must be private to this user (mode 0600)")
    token = path.read_text().strip()
    if len(token) < 16:
        raise ValueError(f"the token in {path} is shorter than 16 characters")
    return token
