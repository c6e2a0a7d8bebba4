"""SQLAlchemy tables. Schema changes go through Alembic (server/store/migrations)."""

from datetime import UTC, datetime

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Integer, LargeBinary, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"

    run_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    strategy: Mapped[str] = mapped_column(String(32))
    model_id: Mapped[str] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    num_rounds: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="running")
    config: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    error: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    # The Flower run whose ServerApp owns this run now: only it may publish (a fencing token).
    attempt: Mapped[str | None] = mapped_column(
        String(32), nullable=True, doc="the Flower run whose ServerApp owns this run now"
    )
    resumes: Mapped[int] = mapped_column(
        Integer, default=0, doc="how many times the run was resumed after its ServerApp stopped"
    )


class Round(Base):
    __tablename__ = "rounds"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    fed_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    fed_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    train_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    sampled: Mapped[int] = mapped_column(Integer, default=0)
    replied: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    rejected: Mapped[int] = mapped_column(Integer, default=0)
    bytes_up: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_down: Mapped[int] = mapped_column(BigInteger, default=0)
    tracked: Mapped[int] = mapped_column(BigInteger, default=0)
    churn: Mapped[float] = mapped_column(Float, default=0.0)
    replayed: Mapped[int] = mapped_column(Integer, default=0)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class PublishedModel(Base):
    __tablename__ = "models"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    checksum: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    tracked: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ServerState(Base):
    """The strategy's server optimizer state after a run's latest round: what a resumed run continues."""

    __tablename__ = "server_state"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Node(Base):
    __tablename__ = "nodes"

    node_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    profile: Mapped[str | None] = mapped_column(String(64), nullable=True)
    partition_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    budget_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    state_bytes: Mapped[int | None] = mapped_column(
        BigInteger, nullable=True, doc="model-state bytes the device last reported keeping between steps"
    )
    peak_bytes: Mapped[int | None] = mapped_column(
        BigInteger, nullable=True, doc="the peak bytes the device last measured in a training step"
    )
    process_rss_bytes: Mapped[int | None] = mapped_column(
        BigInteger, nullable=True, doc="a board's last ClientApp process's peak resident memory (VmHWM)"
    )
    board_rss_bytes: Mapped[int | None] = mapped_column(
        BigInteger,
        nullable=True,
        doc="the peak resident memory of everything the board ran for its last round "
        "(SuperNode, SuperExec, ClientApp), where its ClientApp could see all three",
    )
    trainer: Mapped[str | None] = mapped_column(
        String(32),
        nullable=True,
        doc="how its budget lets the device train: dense, streaming, streaming-blocks",
    )
    k: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    rounds_joined: Mapped[int] = mapped_column(Integer, default=0)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    rejected: Mapped[int] = mapped_column(Integer, default=0)
    bytes_up: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_down: Mapped[int] = mapped_column(BigInteger, default=0)
    last_error: Mapped[str | None] = mapped_column(String(2000), nullable=True)
