"""The ClientApp launcher's own weight: Flower's entry point without the SuperNode it never runs."""

import subprocess
import sys
import textwrap


def test_the_clientapp_entry_point_loads_without_the_supernode():
    code = textwrap.dedent(
        """
        import sys
        from dropfleet.fleet.launcher import _flwr_clientapp
        main = _flwr_clientapp()
        assert main.__name__ == "flwr_clientapp" and main.__module__ == "flwr.supernode.cli.flwr_clientapp"
        supernode = ("sqlalchemy", "alembic", "flwr.supernode.cli.flower_supernode")
        heavy = [m for m in supernode if m in sys.modules]
        assert not heavy, heavy
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
