"""Shared fixtures: the real Fashion-MNIST files, loaded once per session."""

import pytest
import torch

from dropfleet.common.device.data import Split, load_fashion_mnist
from dropfleet.common.device.data_files import fashion_mnist_dir


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fmnist_test() -> Split:
    if not (fashion_mnist_dir() / "t10k-labels-idx1-ubyte.gz").exists():
        pytest.fail("Fashion-MNIST is missing: run `make install` (apt-get install dataset-fashion-mnist)")
    return load_fashion_mnist("test")


@pytest.fixture(scope="session")
def fmnist_train() -> Split:
    return load_fashion_mnist("train")


@pytest.fixture
def task_identity():
    """Flower stamps messages with the current task's ids; outside a run, set them by hand."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield TaskIdentity
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
