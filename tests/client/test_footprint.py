"""A board's footprint from /proc: real processes named as a board's are, found and summed."""

import json
import subprocess
import sys
import textwrap
import time

from dropfleet.client.footprint import NOT_A_BOARD, board_footprint, peak_rss, supernode_pid
from tests.integration.procs import free_port

# A SuperExec stand-in that starts a "ClientApp" reporting its footprint, as the real one starts
# dropfleet-clientapp: the child's parent is named dropfleet-superexec.
SUPEREXEC = textwrap.dedent(
    """
    import subprocess, sys
    port, python = sys.argv[1:]  # sys.executable here follows the renamed argv[0]
    child = [
        "import json; from dropfleet.client.footprint import board_footprint;"
        "port = __import__('sys').argv[1];"
        "argv = ['/venv/bin/dropfleet-clientapp', '--runtime-api-address', '127.0.0.1:' + port];"
        "f = board_footprint(argv);"
        "print(json.dumps([f.process_rss_bytes, f.board_rss_bytes]))",
        port,
    ]
    done = subprocess.run([python, "-c", *child], capture_output=True, text=True)
    print(done.stdout, done.stderr[-2000:], end="", file=sys.stdout if done.returncode == 0 else sys.stderr)
    """
)


def _named(name: str, code: str, *args: str) -> list[str]:
    """A Python process whose argv[0] is `name`, as a console script's is."""
    return [f"/venv/bin/{name}", "-c", code, *args]


def _clientapp_report(port: str) -> tuple[int, int | None]:
    """What a ClientApp under a SuperExec stand-in reports: its own peak RSS and its board's."""
    done = subprocess.run(
        _named("dropfleet-superexec", SUPEREXEC, port, sys.executable),
        executable=sys.executable,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout, done.stderr
    own, board = json.loads(done.stdout)
    return own, board


def test_a_board_sums_its_supernode_superexec_and_clientapp():
    port = str(free_port())
    # 40 MiB touched: the SuperNode's peak is its own, not the reporter's.
    hold = "b = bytearray(40 << 20); import time; time.sleep(60)"
    node = subprocess.Popen(
        _named("flower-supernode", hold, "--host", "127.0.0.1", "--port", port), executable=sys.executable
    )
    try:
        deadline = time.monotonic() + 30
        while (peak_rss(node.pid) or 0) < 40 << 20:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert supernode_pid(f"127.0.0.1:{port}") == node.pid
        assert supernode_pid(f"127.0.0.1:{int(port) + 1}") is None  # another board's SuperNode
        own, board = _clientapp_report(port)
        # The board: the ClientApp, its parent SuperExec and the SuperNode (>= its 40 MiB).
        assert 5 << 20 < own < board and board > own + (40 << 20)
        # Its SuperNode gone (another PID namespace, as in compose): no board total, not a partial one.
        node.kill()
        node.wait()
        own, board = _clientapp_report(port)
        assert own > 5 << 20 and board is None
    finally:
        node.kill()


def test_only_a_boards_clientapp_process_reports():
    # A simulation's ClientApp shares a Ray worker: its memory is no board's.
    assert board_footprint(["/venv/bin/python", "-m", "pytest"]) == NOT_A_BOARD
    assert peak_rss() > 0 and peak_rss(2**22 + 12345) is None
