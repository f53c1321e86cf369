"""A real (tiny) ONNX graph through the registry and into onnxruntime."""

from __future__ import annotations

import asyncio

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from models_registry.registry import Registry
from models_registry.store import FilesystemStore
from tests.models_registry.conftest import ManifestFactory

LOOKBACK = HORIZON = 4


def tiny_forecaster() -> bytes:
    """y = 2 * x with the contract's signature: x float32[batch, L, channels] -> y[batch, H, ch]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", LOOKBACK, "channels"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", HORIZON, "channels"])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])], "tiny", [x], [y], [two]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # old enough for any recent onnxruntime
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_real_onnx_model_served_from_registry_bytes(
    store: FilesystemStore, make_manifest: ManifestFactory
) -> None:
    m = store.register(
        make_manifest(lookback=LOOKBACK, horizon=HORIZON, opset=17), tiny_forecaster()
    )

    async def load() -> bytes:
        reg = Registry(store)
        name, version = await reg.resolve(m.name)
        data = await reg.onnx_bytes(name, version)
        await reg.close()
        return data

    session = ort.InferenceSession(asyncio.run(load()), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [m.input_name]
    assert [o.name for o in session.get_outputs()] == [m.output_name]
    x = np.arange(3 * LOOKBACK * 5, dtype=np.float32).reshape(3, LOOKBACK, 5)
    (y,) = session.run([m.output_name], {m.input_name: x})
    assert y.shape == (3, HORIZON, 5)  # dynamic batch and channel axes
    np.testing.assert_allclose(y, 2 * x)
