"""A small client of the REST API, used by the `dropfleet` command line."""

import os
import ssl
from typing import Any

import httpx

from dropfleet.common.errors import DropfleetError

API_URL_ENV = "DROPFLEET_API_URL"
TOKEN_ENV = "DROPFLEET_TOKEN"
# The CA that signed a published API's certificate (the fleet's ca.crt); default: the system's.
CA_ENV = "DROPFLEET_API_CA"
DEFAULT_API_URL = "http://127.0.0.1:8080"


class ApiError(DropfleetError):
    """The API answered with an error, or could not be reached."""


class ApiClient:
    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0) -> None:
        self.url = (url or os.environ.get(API_URL_ENV) or DEFAULT_API_URL).rstrip("/")
        token = token or os.environ.get(TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        ca = os.environ.get(CA_ENV)
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca) if ca else True
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, verify=verify)

    def _get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self._request("GET", path, **kwargs)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach {self.url}: {exc}") from None
        if response.is_error:
            raise ApiError(f"{response.status_code} from {path}: {_detail(response)}")
        return response

    def status(self) -> dict[str, Any]:
        ready = self._get("/v1/ready").json()
        runs = self._get("/v1/runs").json()
        latest = runs[0] if runs else None
        rounds = self._get(f"/v1/runs/{latest['run_id']}/rounds").json() if latest else []
        return {
            "api": self.url,
            "ready": ready["status"],
            "runs": len(runs),
            "latest_run": latest,
            "latest_round": rounds[-1] if rounds else None,
        }

    def runs(self) -> list[dict[str, Any]]:
        return self._get("/v1/runs").json()

    def rounds(self, run_id: str) -> list[dict[str, Any]]:
        return self._get(f"/v1/runs/{run_id}/rounds").json()

    def model_bytes(self, run_id: str, server_round: int | None = None) -> tuple[bytes, dict[str, str]]:
        params = {"format": "protobuf"} | ({"round": server_round} if server_round is not None else {})
        response = self._get(f"/v1/runs/{run_id}/model", params=params)
        return response.content, dict(response.headers)

    def nodes(self) -> list[dict[str, Any]]:
        return self._get("/v1/nodes").json()

    def resume(self, run_id: str, force: bool = False) -> dict[str, Any]:
        """Continue a run from its last published round (needs an admin token)."""
        return self._request("POST", f"/v1/runs/{run_id}/resume", params={"force": force}, timeout=180).json()


def _detail(response: httpx.Response) -> str:
    """FastAPI's error detail as one line: a message, or its validation errors joined."""
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        return response.text[:500]
    if isinstance(detail, list):  # request validation: [{"loc": [...], "msg": ...}, ...]
        return "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', [])[1:])}: {e.get('msg')}"
            if isinstance(e, dict)
            else str(e)
            for e in detail
        )
    return str(detail)


def _validation_error(error: object) -> str:
    if not isinstance(error, dict):
        return str(error)
    where = ".".join(str(p) for p in error.get("loc", [])[1:])  # drop "query"/"path"/"body"
    return f"{where}: {error.get('msg')}"
