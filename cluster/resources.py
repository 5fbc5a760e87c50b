"""GPU-aware planning of a sweep: how many trials fit at once, and where their pieces go.

A Tune trial here is a *driver* (a small CPU bundle given to the trial itself) that launches
a TorchTrainer whose *workers* Ray places in their own placement group, outside the trial's
bundle. Tune therefore cannot see what a trial really occupies: left alone it starts as many
drivers as CPUs allow, and their workers wait for GPUs that never free up. The planner
simulates the placement of whole trials (driver + every worker) on the cluster's nodes, one
trial after another, and the sweep caps ``max_concurrent_trials`` at the count that fits.

Rules the simulation follows (Ray's):
- a bundle (the driver, or one worker) lives on one node: a worker's GPUs come from one node;
- CPU-only bundles (drivers) go to nodes without GPUs first, as Ray's scheduler prefers;
- a fractional GPU request is served from one GPU device; a request >= 1 takes whole devices;
- fractional GPUs only for single-worker trials (two NCCL ranks on one GPU fail);
- STRICT_PACK puts all workers of a trial on one node, STRICT_SPREAD on distinct nodes,
  PACK tries one node first, SPREAD goes round the nodes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from trainers.errors import ClusterError

DRIVER_CPUS = 0.5  # the trial driver mostly waits on its workers; Ray refuses {"CPU": 0}
_EPS = 1e-9
_MAX_PLANNED = 4096  # stop simulating past this many concurrent trials


@dataclass(frozen=True)
class Node:
    """What one Ray node offers (its totals: the sweep plans for the whole cluster)."""

    name: str
    cpus: float
    gpus: float = 0.0
    node_id: str = ""


@dataclass(frozen=True)
class TrialNeeds:
    """What one trial occupies: its driver bundle plus ``num_workers`` worker bundles."""

    num_workers: int
    worker_cpus: float = 1.0
    worker_gpus: float = 0.0
    driver_cpus: float = DRIVER_CPUS
    driver_gpus: float = 0.0
    placement: str = "PACK"
    # the workers are tasks in the trial's own placement group (parallel folds: the trial
    # trains one fold, each worker bundle another), not the worker group of a TorchTrainer,
    # which Ray places in a placement group of its own
    workers_in_trial: bool = False

    def __post_init__(self) -> None:
        if self.num_workers > 1 and 0 < self.worker_gpus < 1 and not self.workers_in_trial:
            raise ClusterError(f"{self.num_workers} workers x {self.worker_gpus:g} GPU: fractional "
                               f"GPUs would put two NCCL ranks on one GPU; use whole GPUs or one "
                               f"worker")
        for what, gpus in (("worker", self.worker_gpus), ("driver", self.driver_gpus)):
            if gpus > 1 and not float(gpus).is_integer():
                raise ClusterError(f"a {what} asks for {gpus:g} GPUs: above 1 Ray hands out "
                                   f"whole GPUs only")
        if self.driver_cpus <= 0:
            raise ClusterError("the trial driver needs a CPU share > 0 (Ray refuses {'CPU': 0})")

    @classmethod
    def from_config(cls, cfg: Any) -> TrialNeeds:
        """The needs of one trial of ``cfg`` (a RunConfig).

        num_workers=0 trains inside the trial process, so the driver bundle carries the
        training's CPUs (and GPU); otherwise the driver only waits and the workers train.
        """
        s = cfg.scaling
        gpus = s.gpus_per_worker if s.use_gpu else 0.0
        if s.num_workers == 0:
            return cls(num_workers=0, driver_cpus=max(s.cpus_per_worker, DRIVER_CPUS),
                       driver_gpus=gpus, placement=s.placement)
        return cls(num_workers=s.num_workers, worker_cpus=s.cpus_per_worker, worker_gpus=gpus,
                   placement=s.placement)

    @classmethod
    def for_folds(cls, cfg: Any, at_once: int) -> TrialNeeds:
        """An in-process k-fold trial that trains ``at_once`` folds at a time: one itself, the
        others in tasks, each with what the trial alone has (so a fold trains as it would)."""
        alone = cls.from_config(cfg)
        return cls(num_workers=at_once - 1, worker_cpus=alone.driver_cpus,
                   worker_gpus=alone.driver_gpus, driver_cpus=alone.driver_cpus,
                   driver_gpus=alone.driver_gpus, placement=alone.placement,
                   workers_in_trial=True)

    @property
    def driver_bundle(self) -> dict[str, float]:
        """The resources to give the trial function (``tune.with_resources``)."""
        bundle = {"CPU": self.driver_cpus}
        if self.driver_gpus:
            bundle["GPU"] = self.driver_gpus
        return bundle

    @property
    def gpus(self) -> float:
        return self.driver_gpus + self.num_workers * self.worker_gpus

    @property
    def cpus(self) -> float:
        return self.driver_cpus + self.num_workers * self.worker_cpus

    def describe(self) -> str:
        driver = _amount(self.driver_cpus, self.driver_gpus)
        if not self.num_workers:
            return f"in-process trial ({driver})"
        worker = _amount(self.worker_cpus, self.worker_gpus)
        if self.workers_in_trial:
            return (f"{self.num_workers + 1} folds at once: one in the trial process ({driver}), "
                    f"{self.num_workers} in task(s) x ({worker})")
        return (f"driver ({driver}) + {self.num_workers} worker(s) x ({worker}), "
                f"placement {self.placement}")


def _amount(cpus: float, gpus: float) -> str:
    return f"{cpus:g} CPU" + (f", {gpus:g} GPU" if gpus else "")


@dataclass
class TrialPlacement:
    """Where the simulation put one trial: node names of its driver and of each worker."""

    trial: int
    driver: str
    workers: list[str]


@dataclass
class ResourcePlan:
    nodes: list[Node]
    needs: TrialNeeds
    max_concurrent: int
    limited_by: str
    placements: list[TrialPlacement] = field(default_factory=list)

    @property
    def folds_at_once(self) -> int:
        return self.needs.num_workers + 1 if self.needs.workers_in_trial else 1

    @property
    def trial_resources(self) -> Any:
        """What ``tune.with_resources`` gets: the trial's bundle, or for parallel folds a
        placement group of it and one bundle per fold (Tune has the trial's tasks use it)."""
        n = self.needs
        if not n.workers_in_trial:
            return n.driver_bundle
        from ray.tune import PlacementGroupFactory

        worker = {"CPU": n.worker_cpus, **({"GPU": n.worker_gpus} if n.worker_gpus else {})}
        return PlacementGroupFactory([n.driver_bundle] + [worker] * n.num_workers,
                                     strategy=n.placement)

    def table(self) -> str:
        """The plan as a markdown table, one row per node, printed before the sweep starts."""
        used: dict[str, list[float]] = {n.name: [0.0, 0.0] for n in self.nodes}
        hosts: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        n = self.needs
        for p in self.placements:
            used[p.driver][0] += n.driver_cpus
            used[p.driver][1] += n.driver_gpus
            hosts[p.driver].append(f"t{p.trial}:driver")
            by_node: dict[str, list[int]] = {}
            for rank, node in enumerate(p.workers):
                used[node][0] += n.worker_cpus
                used[node][1] += n.worker_gpus
                by_node.setdefault(node, []).append(rank)
            for node, ranks in by_node.items():
                hosts[node].append(f"t{p.trial}:w{','.join(map(str, ranks))}")
        head = (f"resource plan: {self.max_concurrent} trial(s) at once (limited by "
                f"{self.limited_by}); each trial: {n.describe()}")
        if n.num_workers and not n.workers_in_trial:
            head += (f"\n  workers leave {self.max_concurrent * n.driver_cpus:g} CPU free on "
                     f"every node: Ray may put any trial's driver there")
        rows = [["node", "CPU", "GPU", "CPU used", "GPU used", "hosts"]]
        for node in self.nodes:
            rows.append([node.name, f"{node.cpus:g}", f"{node.gpus:g}",
                         f"{used[node.name][0]:g}", f"{used[node.name][1]:g}",
                         " ".join(hosts[node.name]) or "-"])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return head + "\n" + "\n".join(lines)

    def workers_per_node(self) -> list[list[int]]:
        """For each planned trial, its worker counts per node (sorted): e.g. [[2], [2]]."""
        out = []
        for p in self.placements:
            counts: dict[str, int] = {}
            for node in p.workers:
                counts[node] = counts.get(node, 0) + 1
            out.append(sorted(counts.values(), reverse=True))
        return out


# --------------------------------------------------------------------------------------------
# Simulated node state


class _Free:
    """Free CPUs and free share of each GPU device of one node."""

    def __init__(self, node: Node):
        self.cpus = node.cpus
        whole = int(math.floor(node.gpus + _EPS))
        rest = node.gpus - whole
        self.gpus = [1.0] * whole + ([rest] if rest > _EPS else [])

    def copy(self) -> _Free:
        other = object.__new__(_Free)
        other.cpus, other.gpus = self.cpus, list(self.gpus)
        return other

    def fits(self, cpus: float, gpus: float) -> bool:
        return self.take(cpus, gpus, dry=True)

    def take(self, cpus: float, gpus: float, dry: bool = False) -> bool:
        if cpus > self.cpus + _EPS:
            return False
        if gpus <= 0:
            devices: list[tuple[int, float]] = []
        elif gpus < 1:  # best fit: the fullest device that still has room packs shares tightly
            room = [(free, i) for i, free in enumerate(self.gpus) if free + _EPS >= gpus]
            if not room:
                return False
            devices = [(min(room)[1], gpus)]
        else:
            idle = [i for i, free in enumerate(self.gpus) if free >= 1 - _EPS]
            if len(idle) < int(gpus):
                return False
            devices = [(i, 1.0) for i in idle[: int(gpus)]]
        if not dry:
            self.cpus -= cpus
            for i, share in devices:
                self.gpus[i] -= share
        return True


def _plan(nodes: list[Node], needs: TrialNeeds, m: int) -> list[TrialPlacement] | None:
    """Place ``m`` concurrent trials, or None when they cannot all be placed.

    Ray places a trial's driver bundle wherever CPU is free, GPU nodes included, before its
    workers ask for theirs. So the workers of ``m`` trials are placed with every node keeping
    ``m x driver CPUs`` free (the worst case: all drivers land on that node); the drivers are
    then shown where they typically go (nodes without GPUs first, as Ray prefers).
    """
    names = [n.name for n in nodes]
    free = [_Free(n) for n in nodes]
    # (a placement group of the trial's own is placed whole: its first bundle is not a driver
    # that lands before its workers)
    reserve = m * needs.driver_cpus if needs.num_workers and not needs.workers_in_trial else 0.0
    held = [min(f.cpus, reserve) for f in free]
    for f, r in zip(free, held):
        f.cpus -= r
    workers = []
    for _ in range(m):
        w = _place_workers(free, needs)
        if w is None:
            return None
        workers.append(w)
    for f, r in zip(free, held):
        f.cpus += r
    order = sorted(range(len(free)),
                   key=lambda i: bool(sum(free[i].gpus)) and not needs.driver_gpus)
    placements = []
    for t in range(m):
        d = next((i for i in order if free[i].take(needs.driver_cpus, needs.driver_gpus)), None)
        if d is None:
            return None
        placements.append(TrialPlacement(t + 1, names[d], [names[i] for i in workers[t]]))
    return placements


def _place_workers(free: list[_Free], needs: TrialNeeds) -> list[int] | None:
    n, cpus, gpus = needs.num_workers, needs.worker_cpus, needs.worker_gpus
    if n == 0:
        return []
    return WORKER_PLACERS.get(needs.placement, _pack)(free, n, cpus, gpus)


def _all_on_one(free: list[_Free], n: int, cpus: float, gpus: float) -> list[int] | None:
    for i, f in enumerate(free):
        trial = f.copy()
        if all(trial.take(cpus, gpus) for _ in range(n)):
            free[i] = trial
            return [i] * n
    return None


def _pack(free: list[_Free], n: int, cpus: float, gpus: float) -> list[int] | None:
    one = _all_on_one(free, n, cpus, gpus)
    if one is not None:
        return one
    out = []
    for _ in range(n):  # fill the node with the most room first, as few nodes as possible
        order = sorted(range(len(free)), key=lambda i: (-sum(free[i].gpus), -free[i].cpus))
        i = next((i for i in order if free[i].take(cpus, gpus)), None)
        if i is None:
            return None
        out.append(i)
    return out


def _spread(free: list[_Free], n: int, cpus: float, gpus: float,
            strict: bool = False) -> list[int] | None:
    out: list[int] = []
    start = 0
    for _ in range(n):
        candidates = [(start + k) % len(free) for k in range(len(free))]
        if strict:
            candidates = [i for i in candidates if i not in out]
        i = next((i for i in candidates if free[i].take(cpus, gpus)), None)
        if i is None:
            return None
        out.append(i)
        start = i + 1
    return out


WORKER_PLACERS = {
    "PACK": _pack,
    "STRICT_PACK": _all_on_one,
    "SPREAD": _spread,
    "STRICT_SPREAD": lambda free, n, c, g: _spread(free, n, c, g, strict=True),
}


# --------------------------------------------------------------------------------------------
# The planner


def plan_trial_resources(nodes: Iterable[Node | Mapping[str, Any]], trial: TrialNeeds,
                         cap: int | None = None) -> ResourcePlan:
    """How many trials of ``trial`` run at once on ``nodes``, and where each part goes.

    ``nodes`` are ``Node``s or mappings like ``{"CPU": 8, "GPU": 2}`` (one per node).
    ``cap`` (tune.max_concurrent) bounds the count from above. Raises ``ClusterError`` when
    not even one trial can be placed, saying which part does not fit.
    """
    nodes = [_as_node(n, i) for i, n in enumerate(nodes)]
    if not nodes:
        raise ClusterError("the cluster has no alive nodes to plan trials on")
    limit = min(cap, _MAX_PLANNED) if cap else _MAX_PLANNED
    placements = _plan(nodes, trial, 1) or []
    if placements:  # feasibility only shrinks as m grows: double, then bisect
        lo, hi = 1, 2
        while hi <= limit and _plan(nodes, trial, hi) is not None:
            lo, hi = hi, hi * 2
        hi = min(hi, limit + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if _plan(nodes, trial, mid) is not None else (lo, mid)
        placements = _plan(nodes, trial, lo) or placements
    if not placements:
        raise ClusterError(_why_not(nodes, trial))
    limited_by = (f"tune.max_concurrent={cap}" if cap and len(placements) == cap
                  else _bottleneck(nodes, trial, len(placements) + 1))
    return ResourcePlan(nodes, trial, len(placements), limited_by, placements)


def _as_node(n: Node | Mapping[str, Any], i: int) -> Node:
    if isinstance(n, Node):
        return n
    return Node(name=str(n.get("name", f"node-{i}")), cpus=float(n.get("CPU", 0.0)),
                gpus=float(n.get("GPU", 0.0)), node_id=str(n.get("node_id", "")))


def _bottleneck(nodes: list[Node], needs: TrialNeeds, m: int) -> str:
    """Why ``m`` trials do not fit: GPUs or CPUs run out in total, or they are split badly."""
    if needs.gpus and m * needs.gpus > sum(n.gpus for n in nodes) + _EPS:
        return "GPU"
    if m * needs.cpus > sum(n.cpus for n in nodes) + _EPS:
        return "CPU"
    if needs.num_workers:
        return "placement: each node keeps CPU free for drivers that may land on it"
    return "placement (free resources are split across nodes)"


def _why_not(nodes: list[Node], needs: TrialNeeds) -> str:
    biggest_cpu = max(n.cpus for n in nodes)
    biggest_gpu = max(n.gpus for n in nodes)
    total_cpu, total_gpu = sum(n.cpus for n in nodes), sum(n.gpus for n in nodes)
    have = (f"the cluster has {len(nodes)} node(s), {total_cpu:g} CPU and {total_gpu:g} GPU in "
            f"all, at most {biggest_cpu:g} CPU / {biggest_gpu:g} GPU on one node")
    what = f"one trial needs {needs.describe()}"
    if needs.worker_gpus > biggest_gpu or needs.driver_gpus > biggest_gpu:
        reason = "a single worker's GPUs must come from one node, and no node has enough"
    elif needs.gpus > total_gpu:
        reason = "more GPUs than the whole cluster has"
    elif needs.cpus > total_cpu:
        reason = "more CPUs than the whole cluster has"
    else:
        reason = f"no placement exists under {needs.placement}"
    return f"{what}: {reason}; {have} (lower scaling.num_workers / per-worker resources)"


def cluster_nodes() -> list[Node]:
    """The alive nodes of the connected Ray cluster with their total CPU/GPU."""
    import ray

    nodes = []
    def is_head(n: dict) -> bool:
        return "node:__internal_head__" in n.get("Resources", {})

    for n in sorted(ray.nodes(), key=lambda n: not is_head(n)):
        if not n.get("Alive"):
            continue
        res = n.get("Resources", {})
        node_id = n.get("NodeID", "")
        name = f"{n.get('NodeManagerAddress', 'node')}/{node_id[:6]}"
        if is_head(n):
            name += " (head)"
        nodes.append(Node(name=name, cpus=float(res.get("CPU", 0.0)),
                          gpus=float(res.get("GPU", 0.0)), node_id=node_id))
    return nodes


def plan_folds(nodes: Iterable[Node | Mapping[str, Any]], cfg: Any, trials: int,
               sequential: ResourcePlan) -> ResourcePlan:
    """The plan for k-fold trials of ``cfg`` training several folds at once (its
    ``folds_at_once``), else ``sequential``, the plan for one fold at a time; ``trials`` is
    the sweep's trial count.

    Trials come first: with tune.parallel_folds=0 folds run side by side only when every
    trial of the sweep already runs at once (one GPU, or more trials than slots: sequential).
    The count is then evened out (5 folds with room for 3: 3 + 2 takes as long as 3 + 2 of
    3; 4 folds with room for 3: 2 + 2, not 3 + 1).
    """
    k, want = cfg.data.folds, cfg.tune.parallel_folds
    if k <= 1 or cfg.scaling.num_workers > 0 or want == 1:
        return sequential
    if want == 0 and trials >= sequential.max_concurrent:
        return sequential
    nodes = list(nodes)
    cap = cfg.tune.max_concurrent
    for at_once in range(min(want or k, k), 1, -1):
        try:
            plan = plan_trial_resources(nodes, TrialNeeds.for_folds(cfg, at_once), cap)
        except ClusterError as e:
            if want:  # asked for: say why it cannot be, and what runs instead
                raise ClusterError(f"tune.parallel_folds={want}: {e}; tune.parallel_folds=0 "
                                   "trains as many folds at once as there is room for, 1 one "
                                   "after another") from None
            continue
        if want or plan.max_concurrent >= trials:
            even = math.ceil(k / math.ceil(k / at_once))
            if even < at_once:
                plan = plan_trial_resources(nodes, TrialNeeds.for_folds(cfg, even), cap)
            return plan
    return sequential
