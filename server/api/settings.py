"""All API settings in one place (environment variables prefixed DROPFLEET_)."""

import os
import secrets
from functools import cached_property
from logging import getLogger
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dropfleet.fleet.flower_env import PROJECT_ROOT, flower_env
from dropfleet.server.store.store import default_database_url

PLACEHOLDER_TOKEN = "change-me"
logger = getLogger(__name__)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DROPFLEET_", extra="ignore")

    environment: Literal["development", "production"] = "development"
    database_url: str = Field(default_factory=default_database_url)
    admin_token: SecretStr = SecretStr(PLACEHOLDER_TOKEN)
    # Without an admin token: read it from this file, created with a random token on first start.
    admin_token_file: Path | None = None
    read_access: Literal["open", "token"] = "open"
    read_token: SecretStr | None = None
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
    # One shared `flwr` query per this many seconds, whoever asks (server/api/superlink.py).
    superlink_cache_seconds: float = Field(5.0, ge=0.5)
    # How often live runs are checked against the SuperLink (0: never).
    reconcile_seconds: float = Field(10.0, ge=0)

    @model_validator(mode="after")
    def _admin_token_from_file(self) -> "Settings":
        given = self.admin_token.get_secret_value()
        if self.admin_token_file is not None and given in ("", PLACEHOLDER_TOKEN):
            self.admin_token = SecretStr(read_or_create_token(self.admin_token_file))
        elif not given:
            raise ValueError("DROPFLEET_ADMIN_TOKEN is empty; set a token or DROPFLEET_ADMIN_TOKEN_FILE")
        return self

    @model_validator(mode="after")
    def _no_placeholder_secrets_in_production(self) -> "Settings":
        if self.environment != "development":
            for name, secret in (("admin_token", self.admin_token), ("read_token", self.read_token)):
                if secret is not None and (
                    secret.get_secret_value() == PLACEHOLDER_TOKEN or len(secret.get_secret_value()) < 16
                ):
                    raise ValueError(
                        f"DROPFLEET_{name.upper()} is a placeholder or shorter than 16 characters; "
                        "set a real secret (or DROPFLEET_ENVIRONMENT=development)"
                    )
            if self.read_access == "token" and self.read_token is None:
                raise ValueError("DROPFLEET_READ_ACCESS=token needs DROPFLEET_READ_TOKEN")
        return self

    @cached_property
    def flower_env(self) -> dict[str, str]:
        """Environment for `flwr` calls: offline-safe, with this deployment's FLWR_HOME."""
        return flower_env(Path(self.flwr_home))


def read_or_create_token(path: Path) -> str:
    """The token in `path`, or a new random one written there (mode 0600) on first use."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32))
        logger.warning("Created a random admin token in %s", path)
    token = path.read_text().strip()
    if len(token) < 16:
        raise ValueError(f"the admin token in {path} is shorter than 16 characters")
    return token
