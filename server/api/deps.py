"""Dependencies shared by the routers: settings, the store, bearer-token auth, follower slots."""

import hmac
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from dropfleet.server.api.settings import Settings
from dropfleet.server.store import Store

_bearer = HTTPBearer(auto_error=False)


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> Store:
    return request.app.state.store


def _token_matches(credentials: HTTPAuthorizationCredentials | None, expected: str) -> bool:
    if credentials is None or credentials.scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(credentials.credentials.encode(), expected.encode())  # constant time


def require_admin(
    settings: Annotated[Settings, Depends(get_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """State-changing routes: the admin bearer token, always."""
    if not _token_matches(credentials, settings.admin):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "a valid admin bearer token is required",
            headers={"WWW-Authenticate": "Bearer"},
        )


def require_read(
    settings: Annotated[Settings, Depends(get_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Read routes: open, or the read (or admin) token when DROPFLEET_READ_ACCESS=token."""
    if settings.read_access == "open":
        return
    tokens = [settings.admin]
    if settings.read_token is not None:
        tokens.append(settings.read_token.get_secret_value())
    if not any(_token_matches(credentials, t) for t in tokens):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "a valid bearer token is required",
            headers={"WWW-Authenticate": "Bearer"},
        )


def flower_connection(settings: Annotated[Settings, Depends(get_settings)]) -> str:
    """The SuperLink connection runs are started on; 503 when the API was started without one."""
    if not settings.flower_connection:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "no SuperLink is configured: set DROPFLEET_FLOWER_CONNECTION to a connection in "
            "$FLWR_HOME/config.toml (dropfleet fleet up and compose do)",
        )
    return settings.flower_connection


class Followers:
    """Open follow connections (SSE streams, long-polls): at most `limit`, so that followers
    cannot starve everyone else's requests; the next one gets 503 with Retry-After."""

    def __init__(self, limit: int) -> None:
        self.limit, self.open = limit, 0  # one event loop touches this: no lock needed

    def acquire(self) -> None:
        if self.open >= self.limit:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                f"{self.limit} followers are connected already; try again shortly",
                headers={"Retry-After": "5"},
            )
        self.open += 1

    def release(self) -> None:
        self.open -= 1

    def hold(self) -> Callable[[], None]:
        """Take a slot for a stream; the returned callable gives it back, once however often called."""
        self.acquire()
        held = [True]

        def give_back() -> None:
            if held:
                held.clear()
                self.release()

        return give_back

    @contextmanager
    def slot(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()


def get_followers(request: Request) -> Followers:
    return request.app.state.followers


StoreDep = Annotated[Store, Depends(get_store)]
FollowersDep = Annotated[Followers, Depends(get_followers)]
ConnectionDep = Annotated[str, Depends(flower_connection)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
