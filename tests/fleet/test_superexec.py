"""dropfleet's SuperExec speaks Flower 1.42's runtime API with Flower's own constants and signatures,
in a fraction of flower-superexec's memory (every fleet test runs it against real SuperNodes)."""

import subprocess
import sys
import time
from pathlib import Path

from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore import constant
from flwr.supercore.auth.superexec import (
    compute_request_body_sha256,
    compute_superexec_signature,
    derive_auth_secret,
)
from flwr.supercore.protobuf.constants import PROTOBUF_MEDIA_TYPE
from flwr.supercore.superexec import run_superexec

from dropfleet.client.footprint import peak_rss
from dropfleet.fleet import superexec
from tests.integration.procs import free_port


def test_the_protocol_constants_are_flowers():
    assert superexec.PROTOBUF_MEDIA_TYPE == PROTOBUF_MEDIA_TYPE
    assert superexec.AUTH_CONTEXT == constant.SUPEREXEC_AUTH_SECRET_CONTEXT
    assert superexec.AUTH_HEADERS == (
        constant.SUPEREXEC_AUTH_TIMESTAMP_HEADER,
        constant.SUPEREXEC_AUTH_NONCE_HEADER,
        constant.SUPEREXEC_AUTH_BODY_SHA256_HEADER,
        constant.SUPEREXEC_AUTH_SIGNATURE_HEADER,
    )
    assert run_superexec._SUPEREXEC_AUTH_METHODS == {superexec.ACQUIRE_METHOD}
    assert superexec.VERSION_HEADERS == {
        constant.FLWR_PACKAGE_NAME_METADATA_KEY: "flwr",
        constant.FLWR_PACKAGE_VERSION_METADATA_KEY: __import__("flwr").__version__,
        constant.FLWR_COMPONENT_NAME_METADATA_KEY: "SuperExec",
    }
    client = Path(sys.modules["flwr.supercore.runtime.runtime_http_client"].__file__).read_text()
    assert f'path="{superexec.ACQUIRE_PATH}",\n            rpc_method="{superexec.ACQUIRE_METHOD}"' in client
    types = {t.value for t in constant.TaskType}
    assert {superexec.CLIENT_APP, superexec.SERVER_APP} <= types


def test_a_request_is_signed_as_flower_signs_it():
    secret = b"board secret \x00\xff"
    request = AcquireTaskRequest(supported_task_types=[superexec.CLIENT_APP, superexec.SERVER_APP])
    body = request.SerializeToString(deterministic=True)
    headers = superexec.auth_headers(secret, body, now=1_790_000_000)
    ts, nonce, digest, signature = (headers[h] for h in superexec.AUTH_HEADERS)
    assert ts == "1790000000" and digest == compute_request_body_sha256(request)
    assert signature == compute_superexec_signature(
        auth_secret=derive_auth_secret(secret), method=superexec.ACQUIRE_METHOD,
        timestamp=1_790_000_000, nonce=nonce, body_sha256=digest,
    )  # fmt: skip
    assert superexec.auth_headers(secret, body)[superexec.AUTH_HEADERS[1]] != nonce  # a fresh nonce


def test_it_waits_for_its_runtime_api_in_a_small_process(tmp_path):
    keys = tmp_path / "app-signer.pub"
    keys.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHkyN4CjgKXP4vBqkXx4bd1vLKMSVVjqDRELxNGqcxUe test\n")
    port = free_port()  # nothing listens: it retries, as for a SuperNode still starting
    exe = Path(sys.executable).parent / "dropfleet-superexec"
    args = ["--insecure", "--runtime-api-address", f"127.0.0.1:{port}", "--trusted-app-keys", str(keys)]
    proc = subprocess.Popen(
        [str(exe), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(8)
        assert proc.poll() is None
        hwm = peak_rss(proc.pid)
        # Flower's flower-superexec: ~140 MiB here; this one imports no more of Flower than its protos.
        assert hwm is not None and hwm < 64 << 20, hwm / 2**20
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    assert f"127.0.0.1:{port}" in out and "retrying" in out
