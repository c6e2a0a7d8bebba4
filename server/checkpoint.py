"""Resuming a run after its ServerApp died: the checkpoint is what the store already published.

Each round is published atomically with its global model, so the last
published round *is* the checkpoint: the seed and init scheme travel inside the
encoded model, the global tracked set is its indices and values, and the
strategy's only state (how many rounds in a row left the model unchanged) is
read back from the round history. A server optimizer's dense state
(momentum, Adam's moments) is published with each round in the same
transaction, so it resumes exactly where the model does.
"""

from dataclasses import dataclass

from dropfleet.common.errors import ConfigError
from dropfleet.common.model.sparse import SparseModel
from dropfleet.common.wire.codec import decode
from dropfleet.fleet.config import RunConfig
from dropfleet.server.store import Store

# A resumed run must train the same model from the same seed with the same strategy.
_PINNED = (("strategy", "strategy"), ("model_id", "model-id"), ("seed", "seed"))


@dataclass(frozen=True)
class Checkpoint:
    run_id: str
    round: int  # the last published round; the resumed run goes on with round + 1
    payload: bytes  # the encoded global model published at that round
    model: SparseModel
    short_rounds: int  # trailing rounds that left the global model unchanged
    server_state: bytes | None = None  # the server optimizer's state after that round, if it has one


def resume(store: Store, config: RunConfig, attempt: str) -> Checkpoint:
    """Take over run `config.resume_run` for Flower run `attempt` and return where it stopped."""
    run_id = config.resume_run
    run = store.get_run(run_id)
    if run is None:
        raise ConfigError(f"cannot resume run {run_id}: the store has no such run")
    for attr, key in _PINNED:
        if run[attr] != getattr(config, attr):
            raise ConfigError(
                f"cannot resume run {run_id} with {key}={getattr(config, attr)!r}: it was started with "
                f"{run[attr]!r}"
            )
    rounds = store.rounds(run_id)
    if not rounds:
        raise ConfigError(f"cannot resume run {run_id}: it published no round; start a new run")
    last = rounds[-1]["round"]
    if last >= config.num_server_rounds:
        raise ConfigError(f"cannot resume run {run_id}: all {config.num_server_rounds} rounds are published")
    published = store.model(run_id, last)
    if published is None:
        raise ConfigError(f"cannot resume run {run_id}: round {last} has no published model")
    store.take_over(run_id, attempt)
    short = 0
    for r in reversed(rounds[1:]):
        if r["replied"] >= config.min_train_nodes:
            break
        short += 1
    payload = bytes(published["data"])
    saved = store.server_state(run_id)
    state = saved[1] if saved is not None and saved[0] == last else None
    return Checkpoint(run_id, last, payload, decode(payload, config.max_payload_bytes), short, state)
