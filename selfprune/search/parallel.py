"""Where a search's candidates are scored: in this process, or on Ray actors (one per GPU or CPU slot).

A pool's ``evaluate(tasks)`` takes a batch of ``(index, rates)`` and yields one :class:`Outcome` per task as
results arrive (any order). The runner journals each outcome and adds the members in index order once the
batch is in, so the search with N workers is the search with one.

:class:`RayPool` starts N actors. Each loads the model once and rebuilds the driver's pruner and fitness from
``Pruner.state()`` and ``Fitness.data()``, put in Ray's object store once by the driver: a worker never
calibrates, scores layers or reads the data files, and builds every candidate exactly as the driver would.
The driver stays the only writer of the run folder.

Faults: an actor that dies mid-evaluation (killed, out of host memory) is restarted by Ray
(``max_restarts=-1``) and its candidate is run again, on another actor where one is idle. A candidate that
fails on :data:`MAX_TRIES` tries (actor deaths or exceptions such as CUDA out of memory) comes back failed;
the runner journals it with fitness ``inf`` and the reason, and the search goes on.

Test-only: ``SELFPRUNE_WORKER_FAULT`` (read by the driver, handed to its workers), comma-separated entries:
``kill:<index>:<marker>`` makes the worker that evaluates candidate <index> write <marker> and SIGKILL itself
mid-evaluation, the first time only (an existing marker means it was done); ``fail:<index>`` makes that
candidate raise on every try; ``hang:<index>:<marker>`` writes <marker> and never returns (a test then kills
the driver at a known point).
"""
from __future__ import annotations

import os
import resource
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from ..errors import SelfpruneError, option

WORKER_FAULT_ENV = "SELFPRUNE_WORKER_FAULT"
#: Tries per candidate before it is journaled as failed.
MAX_TRIES = 2
RAY_EXTRA = "pip install 'selfprune[ray]'"


@dataclass
class Outcome:
    """One candidate's evaluation: the fitness result, or why it failed on every try."""

    index: int
    result: dict | None
    seconds: float
    retries: int = 0
    failed: str | None = None
    worker: int | None = None


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def uses_ray(workers: int, ray_address: str | None) -> bool:
    return int(workers or 1) > 1 or bool(ray_address)


def require_ray(workers: int, ray_address: str | None) -> None:
    """A one-line error when the settings need Ray and it cannot be imported (checked before the model loads)."""
    if not uses_ray(workers, ray_address):
        return
    try:
        import ray  # noqa: F401
    except ImportError:
        asked = (f"{option('workers')} {workers}" if int(workers or 1) > 1
                 else f"{option('ray_address')} {ray_address}")
        raise SelfpruneError(f"{asked} needs Ray: {RAY_EXTRA}") from None


# -- in this process ----------------------------------------------------------------------------------------
class InProcessPool:
    """Scores candidates one after the other in this process (``--workers 1``); exceptions propagate."""

    def __init__(self, evaluate: Callable[[list[float]], dict], candidates: str | None = None):
        self._evaluate = evaluate
        self.candidates = candidates

    def evaluate(self, tasks: Sequence[tuple[int, list[float]]]) -> Iterator[Outcome]:
        for index, rates in tasks:
            started = time.perf_counter()
            result = self._evaluate(list(rates))
            yield Outcome(index, result, time.perf_counter() - started)

    def describe(self) -> dict:
        torch = sys.modules.get("torch")  # the search itself does not need torch (tests score numpy toys)
        return {"mode": "in-process", "workers": 1,
                "worker_threads": torch.get_num_threads() if torch is not None else None,
                "ray_address": None, "candidates": self.candidates}

    def worker_peak_rss_mb(self) -> list[float]:
        return []

    def close(self) -> None:
        pass


# -- on Ray actors ------------------------------------------------------------------------------------------
@dataclass
class WorkerSpec:
    """How a worker loads the model: the arguments of ``selfprune.models.load_model``."""

    model: str
    dtype: str
    device: str
    device_map: object = None
    load_options: dict | None = None  # further keywords of load_model (max_memory, offload_dir) when set


def _fault(spec: str, index: int) -> tuple[str, str] | None:
    """The test fault that applies to candidate ``index``: (kind, marker)."""
    for entry in (spec or "").split(","):
        kind, _, rest = entry.strip().partition(":")
        at, _, marker = rest.partition(":")
        if kind in ("kill", "fail", "hang") and at.strip().isdigit() and int(at) == index:
            return kind, marker
    return None


class EvaluationWorker:
    """A Ray actor's body: the model, loaded once by :meth:`setup`, and the driver's pruner and fitness
    rebuilt on it. The driver calls ``setup`` when the actor starts and again after Ray restarts it (a
    restart runs only the constructor), so no constructor argument has to outlive a crash."""

    def __init__(self, slot: int, fault: str = ""):
        self.slot, self.fault = slot, fault
        self.fitness = None

    def setup(self, spec: WorkerSpec, threads: int, shared: dict) -> dict:
        import torch

        from ..models import load_model

        torch.set_num_threads(max(1, int(threads)))
        options = dict(spec.load_options or {})
        if options.get("offload_dir"):  # workers on one machine must not write the same offloaded files
            options["offload_dir"] = os.path.join(options["offload_dir"], f"worker-{self.slot}")
        model, tokenizer = load_model(spec.model, dtype=spec.dtype, device=spec.device, device_map=spec.device_map,
                                      **options)
        pruner = shared["pruner_class"].from_state(model, shared["pruner"], tokenizer=tokenizer)
        self.fitness = shared["fitness_class"].from_data(pruner, shared["fitness"])
        return {"pid": os.getpid(), "peak_rss_mb": peak_rss_mb()}

    def evaluate(self, index: int, rates: list[float]) -> dict:
        started = time.perf_counter()
        fault = _fault(self.fault, index)
        try:
            if self.fitness is None:
                raise RuntimeError("the worker was not set up")
            if fault and fault[0] == "fail":
                raise RuntimeError(f"test fault: candidate {index} fails ({WORKER_FAULT_ENV})")
            result = self.fitness(list(rates))
        except Exception as exc:  # reported to the driver, which retries on another actor
            _free_accelerator_memory()
            return {"error": _one_line(exc), "seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}
        if fault and fault[0] in ("kill", "hang") and fault[1] and not os.path.exists(fault[1]):
            with open(fault[1], "w") as marker:
                marker.write(str(os.getpid()))
            if fault[0] == "hang":
                while True:
                    time.sleep(60)
            os.kill(os.getpid(), signal.SIGKILL)  # mid-evaluation: scored, but the result never leaves
        return {"result": result, "seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}


def _free_accelerator_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _last_line(exc: BaseException, limit: int = 300) -> str:
    """The useful line of a Ray error (its message ends with the worker's exception)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class _Task:
    index: int
    rates: list[float]
    tries: int = 0


class RayPool:
    """Scores candidates on ``workers`` Ray actors; started on the first batch, stopped by :meth:`close`."""

    def __init__(self, spec: WorkerSpec, shared: dict, workers: int, threads: int = 1,
                 address: str | None = None, candidates: str | None = None, log: Callable[[str], None] | None = None):
        require_ray(workers, address or "local")
        self.spec, self.workers, self.threads = spec, max(1, int(workers)), max(1, int(threads))
        self.address = address if address not in (None, "", "local") else None
        self.candidates = candidates
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self._shared = shared
        self._shared_ref = None
        self._actors: list = []
        self._idle: deque = deque()  # slots of actors ready for a task
        self._probes: dict = {}  # ref of a restarted actor's ``setup`` -> its slot
        self._peaks: dict[int, float] = {}
        self._started_ray = False
        self.deaths = 0

    # -- start / stop ---------------------------------------------------------------------------------------
    def _uses_cuda(self) -> bool:
        from ..models.loading import resolve_device

        return str(resolve_device(self.spec.device)).startswith("cuda")

    def _start(self) -> None:
        import ray

        cuda = self._uses_cuda()
        if not ray.is_initialized():
            quiet = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            if self.address and self.address.startswith("ray://"):  # Ray Client takes none of these keywords
                ray.init(address=self.address)
            elif self.address:
                ray.init(address=self.address, **quiet)
            else:
                if cuda:
                    import torch

                    if torch.cuda.device_count() < self.workers:
                        raise SelfpruneError(
                            f"{option('workers')} {self.workers} needs one GPU each; this machine has "
                            f"{torch.cuda.device_count()}: pass {option('workers')} {torch.cuda.device_count()} or "
                            f"join a larger cluster with {option('ray_address')}")
                ray.init(address="local", num_cpus=self.workers * self.threads, **quiet)
            self._started_ray = True
        resources = ray.cluster_resources()
        need, have = ("GPU", resources.get("GPU", 0)) if cuda else ("CPU", resources.get("CPU", 0))
        wanted = self.workers if cuda else self.workers * self.threads
        if have < wanted:
            self.log(f"the Ray cluster has {have:g} {need} for {wanted} wanted: some workers wait for resources")
        self._shared_ref = ray.put(self._shared)  # once; every actor (and a restarted one) reads this copy
        placement = {"num_gpus": 1} if cuda else {"num_cpus": self.threads}
        actor_class = ray.remote(max_restarts=-1, max_task_retries=0, **placement)(EvaluationWorker)
        fault = os.environ.get(WORKER_FAULT_ENV, "")
        self._actors = [actor_class.remote(slot, fault) for slot in range(self.workers)]
        try:
            for slot, info in enumerate(ray.get([self._setup(slot) for slot in range(self.workers)])):
                self._peaks[slot] = info["peak_rss_mb"]
                self._idle.append(slot)
        except ray.exceptions.RayError as exc:
            self.close()
            raise SelfpruneError(f"a search worker could not start ({_last_line(exc)}): check that {self.spec.model} "
                                 f"loads on every node of the Ray cluster") from None

    def close(self) -> None:
        """Stop the actors; shut Ray down only if this pool started it."""
        if not self._actors and not self._started_ray:
            return
        import ray

        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        self._actors, self._idle, self._probes = [], deque(), {}
        self._shared_ref = None
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False

    # -- scheduling ---------------------------------------------------------------------------------------
    def evaluate(self, tasks: Sequence[tuple[int, list[float]]]) -> Iterator[Outcome]:
        """Send the tasks to idle actors, yield each outcome as it arrives; re-run a task whose actor died or
        that raised, up to MAX_TRIES, preferring another actor. A dead actor gets work again once Ray has
        restarted it and it is set up again: tasks sent while it restarts would fail at once."""
        import ray

        if not self._actors:
            self._start()
        queue = deque(_Task(index, list(rates)) for index, rates in tasks)
        running: dict = {}  # ref -> (slot, task, sent)
        while queue or running:
            while queue and self._idle:
                slot, task = self._idle.popleft(), queue.popleft()
                running[self._actors[slot].evaluate.remote(task.index, task.rates)] = (slot, task, time.perf_counter())
            if queue and not self._idle and not running and not self._probes:
                raise SelfpruneError("every search worker died and none was restarted: resume the run "
                                     f"(with fewer {option('workers')} or another {option('ray_address')})")
            done, _ = ray.wait([*running, *self._probes], num_returns=1)
            for ref in done:
                if ref in self._probes:
                    self._probe_answered(ref)
                    continue
                slot, task, sent = running.pop(ref)
                task.tries += 1
                try:
                    reply = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    self.deaths += 1
                    error = f"worker {slot} died ({type(exc).__name__})"
                    self._probe(slot)
                except ray.exceptions.RayError as exc:
                    error = _last_line(exc)
                    self._idle.append(slot)
                else:
                    self._idle.appendleft(slot)
                    self._peaks[slot] = max(self._peaks.get(slot, 0.0), float(reply.get("peak_rss_mb") or 0.0))
                    error = reply.get("error")
                    if error is None:
                        yield Outcome(task.index, reply["result"], float(reply.get("seconds") or 0.0),
                                      retries=task.tries - 1, worker=slot)
                        continue
                if task.tries >= MAX_TRIES:
                    yield Outcome(task.index, None, time.perf_counter() - sent, retries=task.tries - 1,
                                  failed=f"{task.tries} tries failed; last: {error}", worker=slot)
                else:
                    self.log(f"candidate {task.index}: {error}; trying again")
                    queue.appendleft(task)  # to the next idle actor: another one where there is one

    def _setup(self, slot: int):
        return self._actors[slot].setup.remote(self.spec, self.threads, self._shared_ref)

    def _probe(self, slot: int) -> None:
        """Set a restarted actor up again; it gets work once that answers."""
        self._probes[self._setup(slot)] = slot

    def _probe_answered(self, ref) -> None:
        import ray

        slot = self._probes.pop(ref)
        try:
            info = ray.get(ref)
        except ray.exceptions.ActorUnavailableError:  # still restarting: ask again shortly
            time.sleep(0.2)
            self._probe(slot)
        except ray.exceptions.RayError as exc:  # dead for good (its restart failed): work goes to the others
            self.log(f"worker {slot} could not be restarted ({_last_line(exc)}); going on without it")
        else:
            self._peaks[slot] = max(self._peaks.get(slot, 0.0), float(info.get("peak_rss_mb") or 0.0))
            self._idle.append(slot)

    def describe(self) -> dict:
        return {"mode": "ray", "workers": self.workers, "worker_threads": self.threads,
                "ray_address": self.address or "local", "candidates": self.candidates,
                "worker_deaths": self.deaths}  # this session's; retries and failures come from the journal

    def worker_peak_rss_mb(self) -> list[float]:
        return [self._peaks.get(slot, 0.0) for slot in range(self.workers)]


def make_pool(config: dict, pruner, fitness, log: Callable[[str], None] | None = None):
    """The pool a run's config asks for: in this process for one worker without a cluster, else Ray actors."""
    workers = int(config.get("workers") or 1)
    address = config.get("ray_address")
    candidates = config.get("candidates", "sliced")
    if not uses_ray(workers, address):
        return InProcessPool(fitness, candidates=candidates)
    from .launch import load_options

    spec = WorkerSpec(config["model"], config["dtype"], config["device"], config.get("device_map"),
                      load_options(config))
    shared = {"pruner_class": type(pruner), "pruner": pruner.state(),
              "fitness_class": type(fitness), "fitness": fitness.data()}
    return RayPool(spec, shared, workers, int(config.get("worker_threads") or 1), address, candidates, log)
