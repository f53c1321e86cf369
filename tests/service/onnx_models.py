"""Tiny real ONNX forecasters (onnx.helper + numpy, no torch) and a registry holding them.

Every graph maps x: float32[batch, L, channels] -> y: float32[batch, H, channels], channel by
channel (dynamic batch and channels axes), like the exported students:

    y = w_last * x[:, -1] + w_mean * mean(x over time) + bias     (broadcast to H steps)

so tests know the exact answer. `mlp_bytes` is a dense MLP over the time axis of about the size
of a TimeDistill student, for the latency harness.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models_registry.manifest import Calibration, DatasetInfo, Lineage, Manifest, ModelRef
from models_registry.store import FilesystemStore

OPSET = 17
LEVELS = list(range(50, 100))


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], lookback: int,
           horizon: int, name: str, channels: int | None = None) -> bytes:
    c: int | str = channels if channels is not None else "channels"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", lookback, c])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", horizon, c])
    graph = helper.make_graph(nodes, name, [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def linear_bytes(lookback: int, horizon: int, *, w_last: float = 1.0, w_mean: float = 0.0,
                 bias: float = 0.0, channels: int | None = None) -> bytes:
    """y[b, t, c] = w_last * x[b, L-1, c] + w_mean * mean_t x[b, :, c] + bias, for t < H."""
    inits = [
        numpy_helper.from_array(np.array([-1], np.int64), "start"),
        numpy_helper.from_array(np.array([lookback], np.int64), "end"),
        numpy_helper.from_array(np.array([1], np.int64), "axis"),
        numpy_helper.from_array(np.array([1, horizon, 1], np.int64), "shape"),
        numpy_helper.from_array(np.array(w_last, np.float32), "w_last"),
        numpy_helper.from_array(np.array(w_mean, np.float32), "w_mean"),
        numpy_helper.from_array(np.array(bias, np.float32), "bias"),
    ]
    nodes = [
        helper.make_node("Slice", ["x", "start", "end", "axis"], ["last"]),  # [B, 1, C]
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[1], keepdims=1),  # [B, 1, C]
        helper.make_node("Mul", ["last", "w_last"], ["a"]),
        helper.make_node("Mul", ["mean", "w_mean"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["ab"]),
        helper.make_node("Add", ["ab", "bias"], ["one"]),  # [B, 1, C]
        helper.make_node("Expand", ["one", "shape"], ["y"]),  # [B, H, C]
    ]
    return _model(nodes, inits, lookback, horizon, "linear", channels)


def mlp_bytes(lookback: int, horizon: int, hidden: int = 512, seed: int = 0) -> bytes:
    """Per-channel MLP over time: x[B, L, C] -> [B, C, L] @ W1 -> relu -> @ W2 -> [B, H, C]."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((lookback, hidden)) / np.sqrt(lookback)).astype(np.float32)
    w2 = (rng.standard_normal((hidden, horizon)) / np.sqrt(hidden)).astype(np.float32)
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(np.zeros(hidden, np.float32), "b1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(np.zeros(horizon, np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),  # [B, C, L]
        helper.make_node("MatMul", ["xt", "w1"], ["h0"]),  # [B, C, D]
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["o0"]),  # [B, C, H]
        helper.make_node("Add", ["o0", "b2"], ["o1"]),
        helper.make_node("Transpose", ["o1"], ["y"], perm=[0, 2, 1]),  # [B, H, C]
    ]
    return _model(nodes, inits, lookback, horizon, "mlp")


def flat_calibration(horizon: int, n: int = 1000, base: float = 0.5) -> Calibration:
    """A valid calibration table: quantiles growing with the level and (mildly) the step."""
    steps = 1.0 + np.arange(horizon) / max(1, horizon)
    rows = [(base * (1 + (lvl - 50) / 25) * steps).round(6).tolist() for lvl in LEVELS]
    return Calibration(n=n, levels=LEVELS, quantiles=rows)


def conformal_calibration(scores: np.ndarray) -> Calibration:
    """scores [N, H] of |y - yhat| / s -> the contract's table (finite-sample corrected)."""
    n = scores.shape[0]
    ordered = np.sort(scores, axis=0)
    rows = []
    for level in LEVELS:
        k = min(n, int(np.ceil((n + 1) * level / 100)))  # the k-th smallest
        rows.append(ordered[k - 1].astype(float).tolist())
    return Calibration(n=n, levels=LEVELS, quantiles=rows)


def manifest(name: str, kind: str, lookback: int, horizon: int, *, architecture: str,
             calibration: Calibration | None = None, teachers: Sequence[ModelRef] = (),
             test_mse: float = 0.4, channels: int | None = None,
             lineage: Lineage | None = None) -> Manifest:
    return Manifest(
        name=name,
        kind=kind,  # type: ignore[arg-type]
        architecture=architecture,
        config={"fixture": True},
        lookback=lookback,
        horizon=horizon,
        channels=channels,
        dataset=DatasetInfo(name="ETTh1", file="data/ETTh1.csv",
                            split_borders={"train": (0, 8640), "val": (8304, 11520),
                                           "test": (11184, 14400)}, features="M"),
        frequency="h",
        metrics={"val_mse": test_mse * 0.9, "test_mse": test_mse, "test_mae": test_mse * 1.1},
        calibration=calibration,
        teachers=list(teachers),
        opset=OPSET,
        code_version="fixture",
        lineage=lineage,
    )


FIXTURE_LINEAGE = Lineage(git_commit="0" * 40, git_dirty=False, seed=0, data_file="ETTh1.csv",
                          data_sha256="f" * 64, run_dir="runs/fixture/mlp", train={"seed": 0})


def build_family(store: FilesystemStore, name: str, lookback: int, horizon: int, *,
                 student: bytes | None = None, promote: bool = True) -> dict[str, Manifest]:
    """Register `name` (student: last value) and `name-ensemble` (two teachers:
    mean, and last + 1) with calibration, production aliases set. Returns the manifests."""
    cal = flat_calibration(horizon)
    t1 = store.register(
        manifest(f"{name}-teacher-a", "teacher", lookback, horizon, architecture="mean",
                 calibration=cal, test_mse=0.38),
        linear_bytes(lookback, horizon, w_last=0.0, w_mean=1.0),
    )
    t2 = store.register(
        manifest(f"{name}-teacher-b", "teacher", lookback, horizon, architecture="last+1",
                 calibration=cal, test_mse=0.39),
        linear_bytes(lookback, horizon, w_last=1.0, bias=1.0),
    )
    group = store.register_group(f"{name}-ensemble", members=[t1.ref, t2.ref],
                                 calibration=cal, metrics={"test_mse": 0.37})
    s = store.register(
        manifest(name, "student", lookback, horizon, architecture="last-value",
                 calibration=cal, teachers=[group.ref], lineage=FIXTURE_LINEAGE),
        student if student is not None else linear_bytes(lookback, horizon),
    )
    if promote:
        store.set_alias(name, "production", s.version)
        store.set_alias(group.name, "production", group.version)
    return {"student": s, "ensemble": group, "teacher_a": t1, "teacher_b": t2}


def build_registry(root: Path, name: str = "etth1-h96", lookback: int = 336, horizon: int = 96,
                   *, mlp: bool = False) -> FilesystemStore:
    store = FilesystemStore(root)
    build_family(store, name, lookback, horizon,
                 student=mlp_bytes(lookback, horizon) if mlp else None)
    return store
