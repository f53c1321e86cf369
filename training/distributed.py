"""Supervised training on several workers (processes or machines): ``run_distributed``.

The run is the single-process ``train`` run (``training.train.run_train``) under Ray Train's
``TorchTrainer``: every worker runs the same loop (``training.engine.fit`` on
``training.loop.run_loop``) on a replica of the model wrapped in ``DistributedDataParallel``
(gloo on CPU, NCCL on GPU), so gradients are averaged over the workers after every step and the
replicas stay identical.

- **Data.** The driver reads and windows the CSV once (``prepare``) and puts it in Ray's object
  store: worker machines need no copy of the file. Each epoch, every worker draws the same
  shuffled order of the training windows (same seed) and takes its own shard of it, like
  ``DistributedSampler``: windows ``rank, rank + N, rank + 2N, ...`` (the order is padded by
  wrapping so all shards are equally long). Each worker's batch is ``ceil(batch_size / N)``
  windows, so one step still sees about ``batch_size`` windows across the workers and an epoch has
  as many steps as a single-process epoch: the learning-rate schedule and ``--batch-size`` mean
  the same thing with or without ``--workers``. Validation and test are scored in full on every
  worker (identical weights give identical values, so early stopping agrees everywhere); the
  ``train_loss`` recorded per epoch is worker 0's shard.
- **Checkpoints.** After every epoch, worker 0 reports its run folder (``last.pt``,
  ``best.safetensors``, ``run.json``: the single-process layout) to Ray Train as a
  ``ray.train.Checkpoint``; Ray copies it to ``storage/<run name>/checkpoint_*`` (the two newest
  are kept). A worker restarted by Ray (``max_failures``) or a rerun with ``resume=True`` and the
  same storage continues from the newest one, exactly as ``--resume`` does in one process. When
  the run ends, the newest checkpoint is copied to the run's ``--out`` folder, which then loads
  like any single-process run (``training.checkpoints.load_forecaster``) and exports as usual.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass, is_dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from training.config import RunConfig
from training.data import PreparedData, WindowSet, prepare
from training.engine import FitResult, count_params, fit
from training.loop import LoopResult, seed_everything
from training.models import MODELS, build_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedConfig:
    """Where and on how many workers a run trains.

    ``address``: ``None`` starts a Ray instance on this machine (``workers`` x ``cpus_per_worker``
    CPUs); ``"auto"`` joins the cluster this machine is part of (after ``ray start``);
    ``"ray://HOST:10001"`` drives a remote cluster through Ray Client. ``storage`` is where Ray
    keeps the checkpoints: a local path on one machine, a path every node mounts (NFS) or a
    ``s3://``/``gs://`` URI on a cluster; ``None`` means ``<out>/ray``.
    """

    workers: int = 2
    address: str | None = None
    use_gpu: bool = False
    cpus_per_worker: int = 1
    storage: str | None = None
    max_failures: int = 0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker < 1:
            raise ValueError(f"cpus_per_worker must be >= 1, got {self.cpus_per_worker}")
        if self.max_failures < -1:
            raise ValueError(f"max_failures must be >= -1 (-1: no limit), got {self.max_failures}")


class ShardedWindows(WindowSet):
    """Worker ``rank``'s shard (of ``world``) of a split's windows, drawn anew each epoch.

    ``batches(batch_size, shuffle, generator)`` draws the full order exactly as the single-process
    ``WindowSet`` does (one ``randperm`` from the same generator on every worker), pads it by
    wrapping to a multiple of ``world``, keeps every ``world``-th window from ``rank`` and batches
    them by ``ceil(batch_size / world)``: disjoint shards, the same number and sizes of batches on
    every worker (DDP needs every worker to take every step).
    """

    def __init__(self, windows: WindowSet, rank: int, world: int) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        # Share the series tensor: no copy.
        self.series = windows.series
        self.lookback = windows.lookback
        self.horizon = windows.horizon
        self.start_row = windows.start_row
        self.segments = windows.segments
        self.starts = windows.starts
        self.n_windows = windows.n_windows
        self.rank, self.world = rank, world

    def shard(self, order: Tensor) -> Tensor:
        per = math.ceil(len(order) / self.world)
        padded = torch.cat([order, order[: per * self.world - len(order)]])
        return padded[self.rank :: self.world]

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> list[Tensor]:
        order = (
            torch.randperm(self.n_windows, generator=generator)
            if shuffle
            else torch.arange(self.n_windows)
        )
        return list(self.shard(order).split(math.ceil(batch_size / self.world)))


def _batchnorm_stats(model: nn.Module) -> list[Tensor]:
    """The running statistics of ``model``'s BatchNorm layers (each worker updates its own)."""
    return [
        buf
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for buf in (module.running_mean, module.running_var)
        if buf is not None
    ]


@torch.no_grad()
def _average(stats: list[Tensor], world: int) -> None:
    """Average BatchNorm running statistics over the workers after each optimiser step.

    DDP averages gradients, so the weights stay identical, but each worker's forward updates its
    BatchNorm statistics from its own shard (DDP only broadcasts worker 0's before the next
    forward): without this, the replicas would score validation differently after the last step
    and could disagree about early stopping. (``SyncBatchNorm`` needs CUDA.)
    """
    if world < 2 or not stats:
        return
    flat = torch.cat([s.reshape(-1) for s in stats])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for s in stats:
        s.copy_(flat[offset : offset + s.numel()].view_as(s))
        offset += s.numel()


def _check_agreement(val: float, world: int, device: torch.device) -> None:
    """Fail on every worker at once (not hang at the next step) if the replicas diverged."""
    if world < 2:
        return
    mine = torch.tensor([val], dtype=torch.float64, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    torch.distributed.all_gather(every, mine)
    values = [float(v) for v in every]
    if len(set(values)) > 1:
        raise RuntimeError(f"workers' validation values differ ({values}): the replicas diverged")


def _train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the ``train`` run on this worker's shard, model under DDP."""
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    cfg: RunConfig = config["cfg"]
    data: PreparedData = ray.get(config["data"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(cfg.train.seed)  # same initial weights on every worker
    model = build_model(
        cfg.model,
        lookback=cfg.data.lookback,
        horizon=cfg.data.horizon,
        channels=data.channels,
        **cfg.model_settings,
    )
    device = ray.train.torch.get_device()
    replica = ray.train.torch.prepare_model(model)  # on the device; DDP when world > 1
    if world > 1 and not isinstance(replica, DistributedDataParallel):
        raise RuntimeError(f"worker {rank}: Ray did not wrap the model in DDP ({type(replica)})")
    train = ShardedWindows(data.splits["train"], rank, world)
    shard = replace(data, splits={**data.splits, "train": train})

    local = Path(tempfile.mkdtemp(prefix=f"distilcast-worker{rank}-"))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            shutil.copytree(folder, local, dirs_exist_ok=True)
        log.info("worker %d: continuing from Ray checkpoint %s", rank, checkpoint.path)

    mse = nn.MSELoss()
    stats = _batchnorm_stats(model)

    def step(x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return mse(replica(x.to(device)), y.to(device)), {}

    def report(metrics: dict[str, Any]) -> None:
        # Every worker calls report (it is a barrier); worker 0's folder is the checkpoint.
        ckpt = Checkpoint.from_directory(str(local)) if rank == 0 else None
        ray.train.report(metrics, checkpoint=ckpt, delete_local_checkpoint_after_upload=False)

    def after_epoch(res: LoopResult) -> None:
        row = res.history[-1]
        _check_agreement(float(row["val_mse"]), world, device)
        report(
            {
                "epoch": res.epochs_run,
                "best_epoch": res.best_epoch,
                "train_loss": row["train_loss"],
                "val_mse": row["val_mse"],
                "finished": False,
            }
        )

    try:
        result = fit(
            model,
            shard,
            replace(cfg.train, device=str(device)),  # Ray placed the replica; keep it there
            local,
            loss_fn=step,
            run_info={**config["info"], "workers": world},
            resume=checkpoint is not None,
            desc=f"{cfg.model} worker {rank}/{world}",
            after_epoch=after_epoch,
            after_step=lambda: _average(stats, world),
        )
        # The final folder (run.json with val/test scores of the best epoch) as the last checkpoint.
        report({**result.summary(), "epoch": result.epochs_run})
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _clear_storage(storage: str, name: str) -> None:
    """Remove a previous run's Ray state (else Ray would continue it): local path or URI."""
    from pyarrow import fs as pafs

    filesystem, root = pafs.FileSystem.from_uri(
        storage if "://" in storage else str(Path(storage).resolve())
    )
    filesystem.delete_dir_contents(f"{root.rstrip('/')}/{name}", missing_dir_ok=True)


def run_distributed(
    cfg: RunConfig,
    workers: int = 2,
    address: str | None = None,
    resume: bool = False,
    *,
    use_gpu: bool = False,
    cpus_per_worker: int = 1,
    storage: str | None = None,
    max_failures: int = 0,
) -> FitResult:
    """Train ``cfg`` (the ``train`` command's run) on ``workers`` Ray Train workers.

    The settings are those of :class:`DistributedConfig` (checked there): ``address`` ``None``
    (a private local Ray), ``"auto"`` or ``"ray://HOST:10001"``; ``storage`` for Ray's
    checkpoints (default ``<out>/ray``); ``max_failures`` worker restarts Ray may make.

    Writes the single-process run folder to ``cfg.resolved_out_dir()`` (``best.safetensors``,
    ``last.pt``, ``run.json`` with ``"workers"``) and returns its ``FitResult``. Without
    ``resume``, an earlier run's Ray state under ``storage/<out folder name>`` is removed first;
    with it, the run continues from its newest Ray checkpoint. Ray is started here (and shut down
    after) unless the caller already initialised it.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    dist = DistributedConfig(workers, address, use_gpu, cpus_per_worker, storage, max_failures)
    out_dir = cfg.resolved_out_dir().resolve()
    storage = dist.storage or str(out_dir / "ray")
    name = out_dir.name
    if cfg.train.batch_size < 2 * dist.workers:
        raise ValueError(
            f"batch_size {cfg.train.batch_size} is too small for {dist.workers} workers "
            f"(each worker's batch is ceil(batch_size / workers) and needs 2 windows)"
        )
    data = prepare(cfg.data)  # read once, here; workers get it from the object store
    seed_everything(cfg.train.seed)
    probe = build_model(
        cfg.model,
        lookback=cfg.data.lookback,
        horizon=cfg.data.horizon,
        channels=data.channels,
        **cfg.model_settings,
    )
    model_cfg = probe.cfg
    if not is_dataclass(model_cfg) or isinstance(model_cfg, type):
        raise TypeError(f"{cfg.model}: its config is not a dataclass instance")
    info = {
        "model": cfg.model,
        "kind": MODELS[cfg.model].kind,
        "model_config": asdict(model_cfg),
        "params": count_params(probe),
        "data": asdict(cfg.data),
        "dataset": data.describe(),
    }
    if not resume:
        _clear_storage(storage, name)

    started = not ray.is_initialized()
    if started:
        local = dist.address is None
        ray.init(
            address=dist.address,
            num_cpus=dist.workers * dist.cpus_per_worker if local else None,
            include_dashboard=False if local else None,
            log_to_driver=True,
        )
    try:
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={"cfg": cfg, "data": ray.put(data), "info": info},
            torch_config=TorchConfig(backend="nccl" if dist.use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=dist.workers,
                use_gpu=dist.use_gpu,
                resources_per_worker={"CPU": dist.cpus_per_worker},
            ),
            run_config=ray.train.RunConfig(
                name=name,
                storage_path=storage,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                failure_config=ray.train.FailureConfig(max_failures=dist.max_failures),
            ),
        )
        log.info(
            "training %s on %d workers (%s) -> %s; Ray checkpoints in %s/%s",
            cfg.model,
            dist.workers,
            dist.address or "local Ray",
            out_dir,
            storage,
            name,
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"{name}: the Ray Train run reported no checkpoint")
        out_dir.mkdir(parents=True, exist_ok=True)
        with result.checkpoint.as_directory() as folder:
            for path in Path(folder).iterdir():
                if path.is_file():
                    shutil.copy2(path, out_dir / path.name)
    finally:
        if started:
            ray.shutdown()
    return _fit_result(out_dir)


def _fit_result(out_dir: Path) -> FitResult:
    doc = json.loads((out_dir / "run.json").read_text())
    history = doc["history"]
    return FitResult(
        out_dir,
        int(doc["best_epoch"]),
        len(history),
        float(history[-1]["seconds"]) if history else 0.0,
        doc.get("val", {}),
        doc.get("test", {}),
        history,
        finished=bool(doc["finished"]),
    )


__all__ = ["DistributedConfig", "ShardedWindows", "run_distributed"]
