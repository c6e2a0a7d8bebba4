"""Server momentum on the sparse global delta (FedAvgM, Hsu et al. 2019; Flower's `FedAvgM`).

The published model is w0 + D (D sparse: the global tracked set). The devices'
replies merge into M (sparse: the union of what they tracked). As in Flower's
FedAvgM, the pseudo-gradient is the change the round asks for, M - D, and

    v  <- momentum * v + (M - D)
    D' =  D + server_learning_rate * v

after which the global budget keeps the top K of D'. The velocity v is dense
(N floats): the server may hold dense state, devices never do. With momentum 0
and learning rate 1, D' = M, the plain merge.
"""

import numpy as np

from dropfleet.common.errors import ConfigError


class ServerMomentum:
    """The server's velocity over all N coordinates and one `step` per round."""

    def __init__(self, numel: int, momentum: float, learning_rate: float) -> None:
        if not 0 <= momentum < 1:
            raise ConfigError(f"server momentum must be in [0, 1), got {momentum}")
        if not 0 < learning_rate < float("inf"):
            raise ConfigError(f"server learning rate must be finite and > 0, got {learning_rate}")
        self.momentum, self.learning_rate = momentum, learning_rate
        self.velocity = np.zeros(numel, np.float64)

    def step(
        self, published: tuple[np.ndarray, np.ndarray], merged: tuple[np.ndarray, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The next delta D' from the published (positions, values) and the merge's; sorted positions."""
        (p_pos, p_val), (m_pos, m_val) = published, merged
        step = np.zeros_like(self.velocity)
        step[m_pos] = m_val
        step[p_pos] -= p_val
        self.velocity *= self.momentum
        self.velocity += step
        new = np.zeros_like(self.velocity)
        new[p_pos] = p_val
        new += self.learning_rate * self.velocity
        positions = np.flatnonzero(new)
        return positions, new[positions]

    def state(self) -> np.ndarray:
        """The velocity, for a checkpoint."""
        return self.velocity.copy()

    def load(self, velocity: np.ndarray) -> None:
        if velocity.shape != self.velocity.shape or not np.all(np.isfinite(velocity)):
            raise ConfigError(f"velocity must be {self.velocity.shape} finite floats, got {velocity.shape}")
        self.velocity = velocity.astype(np.float64)
