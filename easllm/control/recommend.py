"""Resource recommendation: the memory a service needs, a setting to give it, and whether it fits here.

memory per replica = weights + KV cache for the context + runtime
  weights:  a GGUF file's size (it is mmapped whole); else parameters x bytes per parameter
  KV cache: 2 (K and V) x layers x KV heads x head size x 2 bytes (f16) per token, x context
  runtime:  the Python server and engine (more for torch), plus 10% of the weights for activations
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from easllm.control.machine import GIB, Machine
from easllm.control.modelfacts import BYTES_PER_PARAM, ModelFacts, model_facts
from easllm.control.spec import ServiceSpec
from easllm.errors import PullFailed
from easllm.models.plan import check_disk

MIB = 1 << 20
RUNTIME_BYTES = {"llamacpp": 512 * MIB, "transformers": GIB, "vllm": 2 * GIB, "fake": 192 * MIB}
GPU_CLASSES_GB = (16, 24, 40, 48, 80, 141)
ENGINE_MODULES = {"llamacpp": "llama_cpp", "transformers": "transformers", "vllm": "vllm"}


def gb(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


@dataclass(frozen=True)
class Problem:
    param: str
    message: str


@dataclass(frozen=True)
class Recommendation:
    model: str
    engine: str
    device: str  # cpu | gpu
    params_b: float | None
    precision: str
    context_tokens: int
    weights_bytes: int
    kv_cache_bytes: int
    runtime_bytes: int
    per_replica_bytes: int
    replicas: int
    recommended: dict[str, int]  # cpu (cores), memory (MiB), gpu (count), gpu_memory (MiB per GPU)
    problems: list[Problem] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "fits": self.fits}

    def summary(self) -> str:
        rec = self.recommended
        lines = [
            f"model {self.model} ({self.params_b or '?'}B parameters, {self.precision}) on {self.engine}, "
            f"{self.device}, context {self.context_tokens} tokens",
            f"memory per replica: {gb(self.per_replica_bytes)} = weights {gb(self.weights_bytes)} + KV cache "
            f"{gb(self.kv_cache_bytes)} + runtime {gb(self.runtime_bytes)}; {self.replicas} replica(s)",
            f"recommended per replica: {rec['cpu']} CPU cores, {rec['memory']} MiB memory"
            + (f", {rec['gpu']} GPU with {rec['gpu_memory'] // 1024} GiB" if rec["gpu"] else ""),
        ]
        lines += [f"cannot deploy: {p.param}: {p.message}" for p in self.problems]
        return "\n".join(lines)


def recommend(spec: ServiceSpec, machine: Machine, home: Path) -> Recommendation:
    options = spec.serve_options()
    gpu = spec.resources.gpu > 0 or spec.engine == "vllm"
    facts = model_facts(spec.model, home, spec.engine, options.quantization, options.model_source, gpu)
    problems: list[Problem] = []
    engine = spec.engine or (facts.default_engine if facts else "llamacpp")
    if engine != "fake":
        problems += _model_problems(spec.model, facts)
        problems += _disk_problems(facts)
        problems += _engine_problems(engine, facts, spec, machine)
    device = "gpu" if engine == "vllm" or spec.resources.gpu > 0 else "cpu"
    context = min(options.ctx_size, facts.context_length) if facts else options.ctx_size
    weights, precision = _weights(engine, facts, spec)
    kv = facts.kv_bytes_per_token * context if facts and engine != "fake" else 0
    runtime = RUNTIME_BYTES[engine] + weights // 10
    per_replica = weights + kv + runtime
    params_b = facts.params_b if facts else None
    recommended = {
        "cpu": _cores(params_b if engine != "fake" else 0.0),
        "memory": _round_up_mib(per_replica * 1.25, 256 if per_replica < 2 * GIB else 1024),
        "gpu": 0,
        "gpu_memory": 0,
    }
    if device == "gpu":
        gpu_need = (weights + kv + GIB) / 0.9
        per_gpu = next((g for g in GPU_CLASSES_GB if g * GIB >= gpu_need), GPU_CLASSES_GB[-1])
        recommended["gpu"] = max(1, math.ceil(gpu_need / (per_gpu * GIB)))
        recommended["gpu_memory"] = per_gpu * 1024
        recommended["memory"] = _round_up_mib(RUNTIME_BYTES[engine] * 2 + weights // 2, 1024)
    host_bytes = per_replica if device == "cpu" else recommended["memory"] * MIB
    problems += _capacity_problems(spec, machine, host_bytes, device, weights + kv)
    return Recommendation(
        spec.model,
        engine,
        device,
        params_b,
        precision,
        context,
        weights,
        kv,
        runtime,
        per_replica,
        spec.replicas,
        recommended,
        problems,
    )


def _weights(engine: str, facts: ModelFacts | None, spec: ServiceSpec) -> tuple[int, str]:
    if engine == "fake" or facts is None:
        return 0, spec.precision or "-"
    if facts.format == "gguf" and facts.weights_bytes is not None:
        return facts.weights_bytes, facts.precision
    precision = spec.precision or ("bf16" if facts.precision not in BYTES_PER_PARAM else facts.precision)
    return int(facts.params_b * 1e9 * BYTES_PER_PARAM[precision]), precision


def _cores(params_b: float | None) -> int:
    size = params_b or 0.0
    return next((cores for limit, cores in ((1, 2), (4, 4), (10, 8), (20, 16)) if size < limit), 32)


def _round_up_mib(n: float, step_mib: int) -> int:
    return int(math.ceil(n / MIB / step_mib) * step_mib)


def _model_problems(model: str, facts: ModelFacts | None) -> list[Problem]:
    if facts is None:
        return [
            Problem(
                "model",
                f"unknown model {model!r}: use a bundled name (qwen2.5-0.5b-instruct, gemma3-270m), a "
                "catalog name (easllm models), a Hugging Face directory with config.json, or a .gguf file",
            )
        ]
    return [] if facts.available else [Problem("model", f"{facts.name}: {facts.missing}")]


def _disk_problems(facts: ModelFacts | None) -> list[Problem]:
    """A model to pull that does not fit on the disk it would be written to."""
    if facts is None or not facts.download_bytes:
        return []
    try:
        check_disk(facts.download_bytes, Path(facts.download_dir), f"pull {facts.name}")
    except PullFailed as exc:
        return [Problem("model", str(exc))]
    return []


def _engine_problems(
    engine: str, facts: ModelFacts | None, spec: ServiceSpec, machine: Machine
) -> list[Problem]:
    problems = []
    module = ENGINE_MODULES[engine]
    if engine == "vllm" and not machine.gpus:
        problems.append(Problem("engine", "vLLM needs a CUDA GPU and this machine has none"))
    elif importlib.util.find_spec(module) is None:
        problems.append(Problem("engine", f"the {engine} engine is not installed here ({module})"))
    if facts is not None:
        if engine == "llamacpp" and facts.format != "gguf":
            problems.append(
                Problem("engine", f"llamacpp needs a .gguf model; {facts.name} is Hugging Face format")
            )
        if engine in ("transformers", "vllm") and facts.format != "hf":
            problems.append(
                Problem(
                    "engine", f"{engine} needs a Hugging Face directory; {facts.name} is GGUF: use llamacpp"
                )
            )
    if spec.precision and facts is not None and facts.format == "gguf":
        problems.append(Problem("precision", "a GGUF model has its own quantisation; leave precision out"))
    return problems


def _capacity_problems(
    spec: ServiceSpec, machine: Machine, per_replica: int, device: str, gpu_bytes: int
) -> list[Problem]:
    """`per_replica`: host memory one replica needs; `gpu_bytes`: GPU memory (device gpu)."""
    problems = []
    res = spec.resources
    if res.cpu is not None and res.cpu > machine.cpus:
        problems.append(Problem("resources.cpu", f"{res.cpu} cores asked; this machine has {machine.cpus}"))
    if res.memory is not None and res.memory * MIB < per_replica:
        problems.append(
            Problem(
                "resources.memory",
                f"{res.memory} MiB is less than the {math.ceil(per_replica / MIB)} MiB this model needs",
            )
        )
    reserve = max(per_replica, (res.memory or 0) * MIB) * spec.replicas
    if reserve > machine.memory_available_bytes:
        problems.append(
            Problem(
                "resources.memory" if res.memory else "model",
                f"{spec.replicas} replica(s) need {reserve / GIB:.1f} GiB of memory; this machine has "
                f"{machine.memory_available_bytes / GIB:.1f} GiB available "
                f"({machine.memory_total_bytes / GIB:.1f} GiB total)",
            )
        )
    if res.gpu > len(machine.gpus):
        problems.append(
            Problem("resources.gpu", f"{res.gpu} GPU(s) asked; this machine has {len(machine.gpus)}")
        )
    elif device == "gpu" and machine.gpus:
        largest = max(g.memory_bytes for g in machine.gpus) * max(res.gpu, 1)
        if gpu_bytes > largest:
            problems.append(
                Problem(
                    "resources.gpu",
                    f"the model needs {gpu_bytes / GIB:.1f} GiB of GPU memory; the GPUs here hold "
                    f"{largest / GIB:.1f} GiB",
                )
            )
    return problems
