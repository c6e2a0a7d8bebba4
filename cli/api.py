"""Serving the REST API (`dropfleet api`) and asking it (`status`, `runs`, `nodes`, `model`, `resume`)."""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dropfleet.cli.output import ApiUrl, AsJson, console, exit_with, from_api, pct, table
from dropfleet.common.errors import DropfleetError

if TYPE_CHECKING:
    from dropfleet.common.model.sparse import SparseModel


def api(
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to bind")] = 8080,
) -> None:
    """Serve the REST API and status page (settings from DROPFLEET_* variables)."""
    import uvicorn
    from pydantic import ValidationError

    from dropfleet.server.api.app import create_app
    from dropfleet.server.api.settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        exit_with(2, "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors()))
    if problem := settings.exposure_problem(host):
        exit_with(2, problem)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")


def status(api: ApiUrl = None, as_json: AsJson = False) -> None:
    """Is the API ready, and how is the latest run doing?"""

    def render(info: dict[str, Any]) -> None:
        console.print(f"API {info['api']}: {info['ready']}, {info['runs']} run(s)")
        run, last = info["latest_run"], info["latest_round"]
        if run:
            console.print(
                f"latest run {run['run_id']} ({run['strategy']}, {run['model_id']}): {run['status']}, "
                f"round {last['round'] if last else 0}/{run['num_rounds']}, "
                f"accuracy {pct(last['accuracy'] if last else None)}"
            )

    from_api(api, lambda client: client.status(), as_json, render)


def runs(api: ApiUrl = None, as_json: AsJson = False) -> None:
    """List runs with their progress."""

    def render(items: list[dict[str, Any]]) -> None:
        out = table("run", "strategy", "model", "status", "rounds", "accuracy", "bytes up", "bytes down")
        for r in items:
            rs = r["rounds"]
            last = rs[-1] if rs else None
            out.add_row(
                r["run_id"],
                r["strategy"],
                r["model_id"],
                r["status"],
                f"{max(len(rs) - 1, 0)}/{r['num_rounds']}",
                pct(last["accuracy"] if last else None),
                f"{sum(x['bytes_up'] for x in rs):,}",
                f"{sum(x['bytes_down'] for x in rs):,}",
            )
        console.print(out)

    from_api(
        api,
        lambda client: [{**r, "rounds": client.rounds(r["run_id"])} for r in client.runs()],
        as_json,
        render,
    )


def nodes(api: ApiUrl = None, as_json: AsJson = False) -> None:
    """List the nodes that took part."""

    def render(items: list[dict[str, Any]]) -> None:
        out = table("node", "profile", "k", "rounds", "failures", "rejected", "bytes up", "last error")
        for n in items:
            out.add_row(
                n["node_id"],
                n["profile"] or "-",
                str(n["k"] or "-"),
                str(n["rounds_joined"]),
                str(n["failures"]),
                str(n["rejected"]),
                f"{n['bytes_up']:,}",
                (n["last_error"] or "")[:200],
            )
        console.print(out)

    from_api(api, lambda client: client.nodes(), as_json, render)


def resume(
    run: Annotated[str, typer.Argument(help="run id")],
    force: Annotated[
        bool, typer.Option(help="stop the previous attempt first if the SuperLink still lists it")
    ] = False,
    api: ApiUrl = None,
    as_json: AsJson = False,
) -> None:
    """Continue a run whose ServerApp died, from its last published round ($DROPFLEET_TOKEN)."""
    from_api(
        api,
        lambda client: client.resume(run, force),
        as_json,
        lambda started: console.print(f"run {started['run_id']} resumed as Flower run {started['attempt']}"),
    )


def model(
    run: Annotated[str, typer.Option("--run", help="run id")],
    out: Annotated[Path, typer.Option("--out", help="file to write")],
    round: Annotated[int | None, typer.Option("--round", help="default: the latest")] = None,
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="protobuf: the sparse wire bytes (proto/sparse_model.proto); pt: a torch state_dict; "
            "onnx: an ONNX graph (input image [batch,1,28,28], output logits)",
        ),
    ] = "protobuf",
    api: ApiUrl = None,
    as_json: AsJson = False,
) -> None:
    """Download a published global model, as its sparse bytes or as a dense PyTorch / ONNX model."""
    from dropfleet.common.device.export import FORMATS
    from dropfleet.common.wire.codec import decode

    if format not in FORMATS:
        exit_with(2, f"--format must be one of {', '.join(FORMATS)}, got {format!r}")

    def fetch(client: Any) -> dict[str, Any]:
        data, headers = client.model_bytes(run, round)
        decoded = decode(data)  # never write bytes that do not decode
        if format == "protobuf":
            out.write_bytes(data)
        else:
            try:
                _export_dense(decoded, out, format)
            except DropfleetError as exc:
                exit_with(1, str(exc))
        return {
            "run_id": run,
            "round": int(headers.get("x-dropfleet-round", -1)),
            "file": str(out),
            "format": format,
            "bytes": out.stat().st_size,
            "k": decoded.num_tracked,
            "seed": decoded.seed,
            "model_id": decoded.model_id,
        }

    def render(info: dict[str, Any]) -> None:
        console.print(
            f"wrote {out} ({format}): run {run} round {info['round']}, {info['model_id']}, "
            f"seed {info['seed']}, {info['k']:,} tracked weights, {info['bytes']:,} bytes"
        )

    from_api(api, fetch, as_json, render)


def _export_dense(decoded: "SparseModel", out: Path, format: str) -> None:
    from dropfleet.common.device.data import load_fashion_mnist
    from dropfleet.common.device.export import (
        calibration_split,
        dense_model,
        export_onnx,
        export_state_dict,
        has_batch_norm,
    )
    from dropfleet.common.model.torch_model import build_model

    calibration = None
    if has_batch_norm(build_model(decoded.model_id)):  # its statistics are re-estimated, as the server does
        calibration = calibration_split(load_fashion_mnist("train"))
    model = dense_model(decoded, calibration)
    (export_state_dict if format == "pt" else export_onnx)(model, out)
