"""The console fetches a service's model once per machine before starting its replicas.

Two services (or versions) wanting one model share one pull; its progress (bytes of the total)
shows in `describe` and the page, and each tenth of the way is an event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from easllm.control.spec import ServiceSpec
from easllm.errors import ModelNotFound
from easllm.models.lock import model_lock
from easllm.models.pull import ModelRef, PulledModel, local_pull, plan, pull, remote_ref

log = logging.getLogger(__name__)
GIB = 1 << 30


@dataclass
class PullProgress:
    model: str
    source: str
    repo_id: str
    state: str = "planning"  # planning | pulling | done | failed
    done_bytes: int = 0
    total_bytes: int = 0
    started_at: float = field(default_factory=time.time)
    error: str = ""

    @property
    def percent(self) -> int:
        return min(100, self.done_bytes * 100 // self.total_bytes) if self.total_bytes else 0

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "percent": self.percent}

    def line(self) -> str:
        return (
            f"{self.repo_id} from {self.source}: {self.percent}% "
            f"({self.done_bytes / GIB:.2f} of {self.total_bytes / GIB:.2f} GiB)"
        )


def spec_ref(spec: ServiceSpec) -> ModelRef | None:
    """What a replica of `spec` would fetch; the console passes --cpu when it asks no GPU."""
    options = spec.serve_options()
    gpu = spec.resources.gpu > 0 or spec.engine == "vllm"
    return remote_ref(spec.model, spec.engine, options.quantization, options.model_source, gpu)


class ModelPulls:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.progress: dict[str, PullProgress] = {}  # ref key -> the latest pull of that model
        self._tasks: dict[str, asyncio.Task[PulledModel]] = {}

    def needed(self, spec: ServiceSpec) -> ModelRef | None:
        """The model `spec` names when it must be fetched first (remote and not on this machine)."""
        if spec.engine == "fake" or spec.runtime != "local":
            return None
        ref = spec_ref(spec)
        return ref if ref is not None and local_pull(ref, self.home) is None else None

    def of(self, spec: ServiceSpec) -> PullProgress | None:
        try:
            ref = spec_ref(spec)
        except ModelNotFound:
            return None
        return self.progress.get(ref.key) if ref is not None else None

    async def fetch_for(
        self, spec: ServiceSpec, event: Callable[[str], None], ref: ModelRef | None = None
    ) -> str | None:
        """Fetch the model `spec` names when it is not here yet, telling `event`; why it failed, or None."""
        try:
            ref = ref or self.needed(spec)
        except ModelNotFound as exc:
            return str(exc)
        if ref is None:
            return None
        event(f"fetching {ref.repo_id} from {ref.source} for the replicas")
        try:
            pulled = await self.ensure(ref, event)
        except Exception as exc:
            event(f"failed: {exc}")
            return f"pulling {ref.repo_id} failed: {exc}"
        event(f"pulled {ref.repo_id}: {pulled.path}")
        return None

    async def ensure(self, ref: ModelRef, event: Callable[[str], None]) -> PulledModel:
        """Pull `ref` (joining a pull already running), telling `event` each tenth of the way."""
        task = self._tasks.get(ref.key)
        if task is None or task.done():
            status = PullProgress(ref.name, ref.source, ref.repo_id)
            self.progress[ref.key] = status
            task = asyncio.create_task(asyncio.to_thread(self._pull, ref, status))
            self._tasks[ref.key] = task
        status = self.progress[ref.key]
        reported = -1
        while not task.done():
            if status.state == "pulling" and status.percent // 10 > reported:
                reported = status.percent // 10
                event(f"pulling {status.line()}")
            await asyncio.wait([task], timeout=1.0)
        return await task

    def _pull(self, ref: ModelRef, status: PullProgress) -> PulledModel:
        def add(n: int) -> None:
            status.done_bytes += n

        try:
            with model_lock(self.home / "pulled" / ref.key, log.info):  # also vs. `easllm pull` and replicas
                local = local_pull(ref, self.home)
                if local is not None:
                    status.state = "done"
                    return local
                remote = plan(ref)
                status.total_bytes, status.state = remote.total_bytes, "pulling"
                pulled = pull(ref, self.home, log.info, add, quiet=True, remote=remote)
        except Exception as exc:
            status.state, status.error = "failed", str(exc)
            raise
        status.done_bytes, status.state = status.total_bytes, "done"
        return pulled
