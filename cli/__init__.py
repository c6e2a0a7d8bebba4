"""The `dropfleet` command line, one module per command group (like Flower's `flwr/cli/`).

It sits above server/ and deploy/: nothing below imports it.
"""
