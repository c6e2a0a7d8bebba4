"""The `dropfleet` command: its command groups assembled (the `dropfleet` entry point)."""

import typer

from dropfleet.cli import api, data, deploy, fleet, simulate

app = typer.Typer(help="dropfleet: federated DropBack on Flower.", no_args_is_help=True)


@app.callback()
def _main() -> None:
    """Federated on-device training with DropBack."""


app.command()(simulate.simulate)
app.command()(api.api)
for query in (api.status, api.runs, api.resume, api.model, api.nodes):
    app.command()(query)
app.add_typer(fleet.app, name="fleet")
app.command()(deploy.compose)
app.command()(deploy.certs)
app.command()(data.partition)


def main() -> None:
    app()
