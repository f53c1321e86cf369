"""Training speed: windows per second of every model's training step, through the project's loop.

    python bench/train_speed.py --threads 2            # the measurement (results/train_speed.*)
    python bench/train_speed.py --profile --threads 2  # where one capped epoch's time goes

Every contender trains on ETTh1's train split (``DataConfig(dataset="ETTh1")``, H = 96) with
the settings of its TOML in ``training/configs/`` (model, batch size, optimiser): PatchTST,
SimMTM / HiMTM / DMAE fine-tuning (``[train]``) and masked pretraining (``[pretrain]``, models
``<name>-pretrain``), and the TimeDistill student (L = 720) with the distillation objective
against the three teachers' cached outputs. The teachers' cache holds random values of the real
shapes (``[N, H, C]`` target, ``[N, C, D_t]`` float16 features): what one epoch costs does not
depend on those values, and the teachers' own pass is run once per dataset, before any epoch.

How it is timed (all in one process, one run, on the same machine):

* a project contender runs ``training.loop.run_loop`` (the loop behind ``train``, ``finetune``,
  ``pretrain`` and ``distill``) for one epoch capped at ``warmup + batches`` batches; a hook
  after every optimiser step stamps the clock, and windows/s is ``batches * batch_size`` over
  the time from the end of the last warm-up step to the end of the last timed step (so it
  counts gathering the windows, the forward, the loss, the backward, the optimiser and the
  loop's own bookkeeping; not the validation);
* ``epoch_seconds`` is one full epoch at that rate (every train batch) plus one validation pass
  timed on its own, as ``run_loop`` runs it after every epoch;
* ``train_speed/bare_torch``: the same PatchTST (same initial weights) and the same batches
  (the loop's own shuffled order, gathered beforehand into a list), trained by a bare
  ``for x, y in loader: opt.zero_grad(); mse(model(x), y).backward(); opt.step()`` loop;
* ``train_speed/neuralforecast``: neuralforecast's ``PatchTST`` with the same hyperparameters
  (patch 16 / stride 8, d_model 16, 4 heads, d_ff 128, 3 layers, dropout 0.3 also in attention,
  BatchNorm post-norm, RevIN, no residual attention (ours has none), learned positions, Adam lr
  1e-3) on the same z-scored train rows, one series per channel, and the same batch: 7 series x
  128 windows = 896 single-channel windows per step, the 128 x 7 rows the project's PatchTST
  sees. It trains through its own Lightning loop (``NeuralForecast.fit``); a callback stamps
  the clock after every step, timed as above, and windows/s counts 7 single-channel windows
  as one 7-channel window;
* the ratio contenders alternate A B C A B C (``--rounds``) so that load from other processes
  falls on all of them alike; each figure is the median over rounds.

Writes ``bench/results/train_speed.json`` (``{"meta", "records"}``) and ``train_speed.md``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import training  # noqa: E402, F401, I001  # first: it sets OpenMP's wait policy before torch loads
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from training.data import DataConfig, PreparedData, WindowSet, prepare  # noqa: E402
from training.engine import evaluate  # noqa: E402
from training.loop import ParamGroup, TrainConfig, run_loop, set_threads  # noqa: E402
from training.models import MODELS, build_model, make_config  # noqa: E402

log = logging.getLogger("bench.train_speed")
RESULTS = REPO / "bench" / "results"
CONFIGS = REPO / "training" / "configs"


def _toml(name: str) -> dict[str, Any]:
    return tomllib.loads((CONFIGS / f"{name}.toml").read_text())


@dataclass
class Job:
    """One contender's training step on the project's loop."""

    name: str
    module: nn.Module  # what the loop optimises (and checkpoints)
    train: WindowSet
    cfg: TrainConfig
    step: Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]
    validate: Callable[[], float]
    after_step: Callable[[], None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _train_cfg(table: dict[str, Any], threads: int) -> TrainConfig:
    return TrainConfig(**{**table, "threads": threads, "progress": False})


def _mse_step(model: nn.Module) -> Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]:
    mse = nn.MSELoss()
    return lambda x, y: (mse(model(x), y), {})


def forecaster_job(name: str, data: PreparedData, threads: int) -> Job:
    """Supervised training (PatchTST) or fine-tuning (the masked-pretraining teachers)."""
    conf = _toml(name)
    torch.manual_seed(0)
    model = build_model(name, lookback=336, horizon=96, **conf["model"])
    val = data.splits["val"]
    cfg = _train_cfg(conf["train"], threads)
    return Job(
        name,
        model,
        data.splits["train"],
        cfg,
        _mse_step(model),
        lambda: evaluate(model, val, data.scaler, cfg.eval_batch_size)["mse"],
    )


def pretrain_job(name: str, data: PreparedData, threads: int) -> Job:
    """Masked pretraining as ``training.pretrain.run_pretrain`` runs it (windows of L + 1)."""
    from training.pretrain import pretext_val_loss  # the loop's validation for pretraining

    conf = _toml(name)
    module = __import__(f"training.models.{name}", fromlist=["build_pretrainer"])
    model_cfg = make_config(name, lookback=336, horizon=96, **conf["model"])
    torch.manual_seed(0)
    pretrainer: nn.Module = module.build_pretrainer(model_cfg)
    cfg = _train_cfg(conf["pretrain"], threads)
    val = data.splits["val"]
    return Job(
        f"{name}-pretrain",
        pretrainer,
        data.splits["train"],
        cfg,
        lambda x, _: pretrainer(x),
        lambda: pretext_val_loss(pretrainer, val, cfg, cfg.val_max_windows),
        after_step=pretrainer.after_step,  # type: ignore[arg-type]
    )


def student_job(data: PreparedData, threads: int) -> Job:
    """The TimeDistill student (mlp, L = 720) with the distillation objective of ``distill``."""
    from training.distill import DistillConfig
    from training.distill_losses import DistillationLoss
    from training.distill_teachers import TeacherWindows

    conf = _toml("distill")
    table = conf["distill"]
    dcfg = DistillConfig(**{**table, "teachers": tuple(table["teachers"])})
    alpha, beta = dcfg.alpha_beta(data.info.name)
    teacher_names = list(dcfg.teachers)
    dims = [
        build_model(t, lookback=dcfg.teacher_lookback, horizon=96, **_toml(t)["model"]).feature_dim
        for t in teacher_names
    ]
    base = data.splits["train"]
    n, c = len(base), data.channels
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(n, 96, c, generator=gen)  # [N, H, C]
    features = [torch.randn(n, c, d, generator=gen).half() for d in dims]  # [N, C, D_t]
    torch.manual_seed(0)
    student = build_model("mlp", lookback=720, horizon=96, **conf["model"])
    criterion = DistillationLoss(dcfg.loss, alpha, beta, dims, student.feature_dim)
    trainable = nn.ModuleDict({"student": student, "criterion": criterion})
    windows = TeacherWindows(base, target, features, [])
    windows.teachers = [None] * len(dims)  # type: ignore[list-item]  # every feature is cached

    def objective(x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        batch = windows.current
        assert batch is not None
        y_s, h_s = student.forward_features(x)
        terms = criterion(y_s, h_s, y, batch.y, batch.h)
        return terms["total"], {k: v.detach() for k, v in terms.items() if k != "total"}

    cfg = _train_cfg(conf["train"], threads)
    val = data.splits["val"]
    return Job(
        "student-distill",
        trainable,
        windows,
        cfg,
        objective,
        lambda: evaluate(student, val, data.scaler, cfg.eval_batch_size)["mse"],
        extra={"teachers": teacher_names, "alpha": alpha, "beta": beta},
    )


def run_job(job: Job, n_batches: int, out_dir: Path, validate: bool = False) -> list[float]:
    """One capped epoch of ``run_loop``; the clock after every optimiser step."""
    stamps: list[float] = []

    def after_step() -> None:
        if job.after_step is not None:
            job.after_step()
        stamps.append(time.perf_counter())

    run_loop(
        module=job.module,
        groups=[ParamGroup("all", [p for p in job.module.parameters() if p.requires_grad])],
        train=job.train,
        cfg=replace(job.cfg, epochs=1, max_train_batches=n_batches),
        out_dir=out_dir,
        step=job.step,
        validate=job.validate if validate else lambda: 0.0,
        best_weights=job.module.state_dict,
        best_file="best.safetensors",
        after_step=after_step,
        desc=job.name,
    )
    return stamps


def rate(stamps: list[float], warmup: int, batch_size: int) -> float:
    """Windows per second over the steps after the warm-up."""
    timed = len(stamps) - warmup
    return timed * batch_size / (stamps[-1] - stamps[warmup - 1])


def bare_torch(job: Job, n_batches: int) -> list[float]:
    """The floor: a bare loop over the same batches, gathered beforehand."""
    cfg = job.cfg
    generator = torch.Generator().manual_seed(cfg.seed)
    order = job.train.batches(cfg.batch_size, shuffle=True, generator=generator)[:n_batches]
    loader = [job.train.batch(index) for index in order]
    model = job.module
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    mse = nn.MSELoss()
    stamps: list[float] = []
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        loss = mse(model(x), y)
        loss.backward()
        opt.step()
        stamps.append(time.perf_counter())
    return stamps


def neuralforecast_patchtst(
    data: PreparedData, n_batches: int, seed: int, threads: int
) -> tuple[list[float], int]:
    """neuralforecast's PatchTST, PatchTST.toml's hyperparameters; clock after every step."""
    import pandas as pd
    import pytorch_lightning as pl
    from neuralforecast import NeuralForecast
    from neuralforecast.models import PatchTST

    conf = _toml("patchtst")
    m, t = conf["model"], conf["train"]
    series = data.splits["train"].series.numpy()  # [T, C] z-scored train rows
    rows, c = series.shape
    dates = pd.date_range("2016-07-01", periods=rows, freq="h")
    frame = pd.DataFrame(
        {
            "unique_id": np.repeat([f"ch{k}" for k in range(c)], rows),
            "ds": np.tile(dates, c),
            "y": series.T.reshape(-1),
        }
    )
    stamps: list[float] = []

    class Clock(pl.Callback):
        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            stamps.append(time.perf_counter())

    model = PatchTST(
        h=96,
        input_size=336,
        patch_len=m["patch_len"],
        stride=m["stride"],
        hidden_size=m["d_model"],
        n_heads=m["n_heads"],
        linear_hidden_size=m["d_ff"],
        encoder_layers=m["n_layers"],
        dropout=m["dropout"],
        attn_dropout=m["dropout"],
        fc_dropout=0.0,
        head_dropout=0.0,
        revin=True,
        revin_affine=True,
        revin_subtract_last=False,
        res_attention=False,
        learn_pos_embed=True,
        loss=__import__("neuralforecast.losses.pytorch", fromlist=["MSE"]).MSE(),
        max_steps=n_batches,
        learning_rate=t["lr"],
        val_check_steps=10**6,
        batch_size=c,
        windows_batch_size=t["batch_size"] * c,
        scaler_type="identity",
        random_seed=seed,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        accelerator="cpu",
        callbacks=[Clock()],
    )
    nf = NeuralForecast(models=[model], freq="h")
    nf.fit(df=frame, val_size=0)
    set_threads(threads)  # in case Lightning changed them
    return stamps, t["batch_size"]


def time_validation(job: Job) -> float:
    t0 = time.perf_counter()
    job.validate()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- profile


def profile_job(job: Job, n_batches: int, out_dir: Path) -> dict[str, Any]:
    """cProfile over one capped epoch (with validation): seconds per part of the loop."""
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    run_job(job, n_batches, out_dir, validate=True)
    prof.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof)
    raw: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]

    def cum(pred: Callable[[str, str], bool]) -> float:
        return sum(v[3] for (f, _, fn), v in raw.items() if pred(f, fn))

    def own(pred: Callable[[str, str], bool]) -> float:
        return sum(v[2] for (f, _, fn), v in raw.items() if pred(f, fn))

    epoch = cum(lambda f, fn: fn == "train_epoch")
    parts = {
        "windows (WindowSet.batch/batches)": cum(
            lambda f, fn: f.endswith(("data.py", "distill.py")) and fn in ("batch", "batches")
        ),
        "backward": own(lambda f, fn: "run_backward" in fn),
        "optimizer (zero_grad + step)": cum(
            lambda f, fn: f.endswith("optimizer.py") and fn in ("zero_grad", "wrapper")
        ),
        "after_step (EMA)": cum(lambda f, fn: fn == "after_step" and "models" in f),
        "progress bar": cum(lambda f, fn: "tqdm" in f and fn in ("__iter__", "set_postfix")),
    }
    # What is left of the epoch's training part: the step's forward and loss (and the loop's
    # own bookkeeping, which the top list shows when it matters).
    parts["forward + loss"] = epoch - sum(parts.values())
    parts["training epoch (all of the above)"] = epoch
    parts["evaluation"] = cum(lambda f, fn: fn in ("evaluate", "pretext_val_loss"))
    parts["checkpoint"] = cum(lambda f, fn: fn in ("_atomic_save", "save_file"))
    top = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:12]
    return {
        "model": job.name,
        "batches": n_batches,
        "batch_size": job.cfg.batch_size,
        "wall_s": round(wall, 2),
        "parts_s": {k: round(v, 3) for k, v in parts.items()},
        "top_own_time": [
            {"fn": f"{Path(f).name}:{line}({fn})", "calls": v[1], "own_s": round(v[2], 3)}
            for (f, line, fn), v in top
        ],
    }


# --------------------------------------------------------------------------- main


def build_jobs(
    names: list[str], data: PreparedData, pre: PreparedData, s: PreparedData, threads: int
) -> list[Job]:
    jobs = []
    for name in names:
        if name.endswith("-pretrain"):
            jobs.append(pretrain_job(name.removesuffix("-pretrain"), pre, threads))
        elif name == "student-distill":
            jobs.append(student_job(s, threads))
        else:
            jobs.append(forecaster_job(name, data, threads))
    return jobs


DEFAULT_MODELS = [
    "patchtst",
    "simmtm",
    "simmtm-pretrain",
    "himtm",
    "himtm-pretrain",
    "dmae",
    "dmae-pretrain",
    "student-distill",
]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=None, help="folder holding ETTh1.csv")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (inter-op: 1)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--batches", type=int, default=8, help="timed steps per contender and round")
    p.add_argument("--rounds", type=int, default=2, help="A B C rounds of the ratio contenders")
    p.add_argument("--no-peers", action="store_true", help="skip neuralforecast")
    p.add_argument("--profile", action="store_true", help="cProfile each model instead")
    p.add_argument("--out", default=str(RESULTS / "train_speed"), help="results path stem")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.batches < 1 or args.rounds < 1:
        p.error("--warmup, --batches and --rounds must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("pytorch_lightning", "lightning", "lightning_fabric", "neuralforecast"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    set_threads(args.threads)
    base = DataConfig(dataset="ETTh1", data_dir=args.data_dir, lookback=336, horizon=96)
    data = prepare(base)
    pre = prepare(replace(base, horizon=1))  # pretraining: windows of L + 1
    student_data = prepare(replace(base, lookback=720))
    names = [n for n in args.models.split(",") if n]
    unknown = [
        n for n in names if n.removesuffix("-pretrain") not in MODELS and n != "student-distill"
    ]
    if unknown:
        p.error(f"unknown model(s) {unknown}")
    jobs = build_jobs(names, data, pre, student_data, args.threads)
    n = args.warmup + args.batches
    tmp = Path(tempfile.mkdtemp(prefix="train_speed_"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    if args.profile:
        profiles = []
        for job in jobs:
            log.info("profiling %s over %d batches", job.name, n)
            profiles.append(profile_job(job, n, tmp / job.name))
            log.info("%s", json.dumps(profiles[-1]["parts_s"]))
        path = out.with_name(out.name + "_profile.json")
        path.write_text(json.dumps({"meta": _meta(args), "profiles": profiles}, indent=2) + "\n")
        print(f"wrote {path}")
        return

    records: list[dict[str, Any]] = []
    by_name = {j.name: j for j in jobs}
    ratio_rates: dict[str, list[float]] = {"project": [], "bare_torch": [], "neuralforecast": []}
    if "patchtst" in by_name:
        job = by_name["patchtst"]
        initial = {k: v.clone() for k, v in job.module.state_dict().items()}
        for r in range(args.rounds):
            # A: the project's loop; B: the bare loop (same initial weights, same batches)
            job.module.load_state_dict(initial)
            stamps = run_job(job, n, tmp / f"patchtst-{r}")
            ratio_rates["project"].append(rate(stamps, args.warmup, job.cfg.batch_size))
            job.module.load_state_dict(initial)
            ratio_rates["bare_torch"].append(
                rate(bare_torch(job, n), args.warmup, job.cfg.batch_size)
            )
            if not args.no_peers:
                nf_stamps, bs = neuralforecast_patchtst(data, n, job.cfg.seed, args.threads)
                ratio_rates["neuralforecast"].append(rate(nf_stamps, args.warmup, bs))
            log.info("round %d: %s", r, {k: v[-1] for k, v in ratio_rates.items() if v})
        job.module.load_state_dict(initial)
    for job in jobs:
        if job.name == "patchtst":
            wps = statistics.median(ratio_rates["project"])
        else:
            wps = rate(run_job(job, n, tmp / job.name), args.warmup, job.cfg.batch_size)
        val_s = time_validation(job)
        per_epoch = len(job.train)
        if job.cfg.max_train_batches:
            per_epoch = min(per_epoch, job.cfg.max_train_batches * job.cfg.batch_size)
        records.append(
            {
                "model": job.name,
                "windows_per_s": round(wps, 2),
                "epoch_seconds": round(per_epoch / wps + val_s, 1),
                "threads": torch.get_num_threads(),
                "batch_size": job.cfg.batch_size,
                "train_windows": per_epoch,
                "validation_seconds": round(val_s, 1),
                **job.extra,
            }
        )
        log.info("%s", records[-1])
    if ratio_rates["project"]:
        proj = statistics.median(ratio_rates["project"])
        records.append(
            {
                "ratio": "train_speed/bare_torch",
                "model": "patchtst",
                "value": round(proj / statistics.median(ratio_rates["bare_torch"]), 3),
                "rounds": {
                    k: [round(x, 2) for x in v]
                    for k, v in ratio_rates.items()
                    if k != "neuralforecast"
                },
            }
        )
        if ratio_rates["neuralforecast"]:
            records.append(
                {
                    "ratio": "train_speed/neuralforecast",
                    "model": "patchtst",
                    "value": round(proj / statistics.median(ratio_rates["neuralforecast"]), 3),
                    "rounds": {
                        k: [round(x, 2) for x in v]
                        for k, v in ratio_rates.items()
                        if k != "bare_torch"
                    },
                }
            )
    doc = {"meta": _meta(args), "records": records}
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(doc))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "command": "python bench/train_speed.py " + " ".join(sys.argv[1:]),
        "dataset": "ETTh1",
        "horizon": 96,
        "threads": {
            "intra_op": torch.get_num_threads(),
            "inter_op": torch.get_num_interop_threads(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        },
        "warmup_batches": args.warmup,
        "timed_batches": args.batches,
        "rounds": args.rounds,
        "method": (
            "windows/s = timed batches x batch size / time from the end of the last warm-up "
            "step to the end of the last timed step (clock stamped after every optimiser step "
            "by a hook); project contenders run training.loop.run_loop capped at warmup + "
            "batches; epoch_seconds = train windows / windows_per_s + one validation pass "
            "timed apart; the ratio contenders (project PatchTST, bare torch loop on the same "
            "batches, neuralforecast PatchTST) alternate in rounds, medians over rounds; "
            "neuralforecast windows count 7 single-channel windows as one 7-channel window"
        ),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _markdown(doc: dict[str, Any]) -> str:
    meta = doc["meta"]
    lines = [
        "# Training speed (ETTh1, H = 96)",
        "",
        f"`{meta['command']}` on {meta['date']}, torch {meta['torch']}, "
        f"{meta['threads']['intra_op']} intra-op / {meta['threads']['inter_op']} inter-op threads "
        f"(OMP_WAIT_POLICY={meta['threads']['OMP_WAIT_POLICY']}). "
        f"{meta['warmup_batches']} warm-up + {meta['timed_batches']} timed batches per contender.",
        "",
        "| model | batch | windows/s | epoch (s) | of which validation (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in doc["records"]:
        if "model" in r and "ratio" not in r:
            lines.append(
                f"| {r['model']} | {r['batch_size']} | {r['windows_per_s']} | "
                f"{r['epoch_seconds']} | {r['validation_seconds']} |"
            )
    lines += ["", "| ratio | model | value | per round (windows/s) |", "|---|---|---:|---|"]
    for r in doc["records"]:
        if "ratio" in r:
            lines.append(f"| {r['ratio']} | {r['model']} | {r['value']} | {r['rounds']} |")
    lines += ["", meta["method"] + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
