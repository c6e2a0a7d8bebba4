"""Server optimizers on the sparse global delta: FedAvgM, FedAdam and FedYogi (Flower's maths and names).

The published model is w0 + D (D sparse: the global tracked set). The devices'
replies merge into M (sparse: the union of what they tracked). As in Flower's
FedAvgM / FedAdam / FedYogi, the pseudo-gradient is the change the round asks
for, delta = M - D, and the optimizer turns it into the next D':

    momentum (FedAvgM, Hsu et al. 2019):  v <- momentum * v + delta
                                          D' = D + server_learning_rate * v
    adam (FedAdam, Reddi et al. 2021):    m <- beta1 * m + (1 - beta1) * delta
                                          v <- beta2 * v + (1 - beta2) * delta^2
                                          D' = D + eta_t * m / (sqrt(v) + tau),
                                          eta_t = eta * sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1))
    yogi (FedYogi):                       v <- v - (1 - beta2) * delta^2 * sign(v - delta^2)
                                          D' = D + eta * m / (sqrt(v) + tau)

after which the global budget keeps the top K of D'. The optimizer state is
dense (N floats each): the server may hold dense state, devices never do.
With momentum 0 and learning rate 1, D' = M, the plain merge. The state
travels in checkpoints (`state`/`load`), so a resumed run continues it.
"""

import io

import numpy as np

from dropfleet.common.errors import ConfigError

OPTIMIZERS = ("momentum", "adam", "yogi")
Positions = tuple[np.ndarray, np.ndarray]


class ServerOptimizer:
    """Dense server state over all N coordinates and one `step` per round."""

    slots: tuple[str, ...] = ()

    def __init__(self, numel: int, learning_rate: float) -> None:
        if not 0 < learning_rate < float("inf"):
            raise ConfigError(f"server learning rate must be finite and > 0, got {learning_rate}")
        self.learning_rate = learning_rate
        self.numel = numel
        self.steps = 0
        for slot in self.slots:
            setattr(self, slot, np.zeros(numel, np.float64))

    def step(self, published: Positions, merged: Positions) -> Positions:
        """The next delta D' from the published (positions, values) and the merge's; sorted positions."""
        (p_pos, p_val), (m_pos, m_val) = published, merged
        delta = np.zeros(self.numel, np.float64)
        delta[m_pos] = m_val
        delta[p_pos] -= p_val
        new = np.zeros(self.numel, np.float64)
        new[p_pos] = p_val
        new += self._update(delta)
        self.steps += 1
        positions = np.flatnonzero(new)
        return positions, new[positions]

    def _update(self, delta: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def state(self) -> bytes:
        """The optimizer's state (step count and slots), for a checkpoint."""
        out = io.BytesIO()
        np.savez(out, steps=np.array(self.steps), **{s: getattr(self, s) for s in self.slots})
        return out.getvalue()

    def load(self, state: bytes) -> None:
        """Continue from `state()`'s bytes; refuses state of another shape, optimizer or non-finite values."""
        try:
            with np.load(io.BytesIO(state), allow_pickle=False) as saved:
                arrays = {name: saved[name] for name in saved.files}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"unreadable server optimizer state: {exc}") from None
        if set(arrays) != {"steps", *self.slots}:
            raise ConfigError(
                f"server optimizer state holds {sorted(arrays)}, expected {['steps', *self.slots]}"
            )
        for slot in self.slots:
            value = arrays[slot]
            if value.shape != (self.numel,) or not np.all(np.isfinite(value)):
                raise ConfigError(f"server optimizer {slot} must be {self.numel} finite floats")
        for slot in self.slots:
            setattr(self, slot, arrays[slot].astype(np.float64))
        self.steps = int(arrays["steps"])


class ServerMomentum(ServerOptimizer):
    """FedAvgM: a velocity of the pseudo-gradients."""

    slots = ("velocity",)

    def __init__(self, numel: int, momentum: float, learning_rate: float) -> None:
        if not 0 <= momentum < 1:
            raise ConfigError(f"server momentum must be in [0, 1), got {momentum}")
        super().__init__(numel, learning_rate)
        self.momentum = momentum

    def _update(self, delta: np.ndarray) -> np.ndarray:
        self.velocity *= self.momentum
        self.velocity += delta
        return self.learning_rate * self.velocity


class ServerAdam(ServerOptimizer):
    """FedAdam (bias-corrected step size, as Flower's) or, with `yogi`, FedYogi's additive second moment."""

    slots = ("m", "v")

    def __init__(
        self, numel: int, learning_rate: float, beta1: float, beta2: float, tau: float, yogi: bool = False
    ) -> None:
        for name, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0 <= value < 1:
                raise ConfigError(f"server {name} must be in [0, 1), got {value}")
        if not 0 < tau < float("inf"):
            raise ConfigError(f"server tau must be finite and > 0, got {tau}")
        super().__init__(numel, learning_rate)
        self.beta1, self.beta2, self.tau, self.yogi = beta1, beta2, tau, yogi

    def _update(self, delta: np.ndarray) -> np.ndarray:
        self.m *= self.beta1
        self.m += (1 - self.beta1) * delta
        square = delta * delta
        if self.yogi:
            self.v -= (1 - self.beta2) * square * np.sign(self.v - square)
            eta = self.learning_rate
        else:
            self.v *= self.beta2
            self.v += (1 - self.beta2) * square
            t = self.steps + 2.0  # Flower's FedAdam: the round number + 1
            eta = self.learning_rate * np.sqrt(1 - self.beta2**t) / (1 - self.beta1**t)
        return eta * self.m / (np.sqrt(self.v) + self.tau)
