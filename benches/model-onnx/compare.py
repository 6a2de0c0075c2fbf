"""The same weights in onnxruntime, beside candle.

Reads what `MODEL_EXPORT_DIR=DIR cargo bench --bench model` left in DIR (the trained
version's model.safetensors and manifest.json, and inputs.json: the encoded rows of 20
and 100 candidates with candle's scores), builds the network as an ONNX graph (Gather for
the item embedding, Concat, Gemm + Relu per hidden layer, Gemm + Sigmoid), checks that
onnxruntime's scores agree with candle's to 1e-5, and times one forward pass on one
thread. Prints one JSON object. See run.sh for the whole command.
"""

import json
import pathlib
import statistics
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file

ROUNDS = 5000


def graph(tensors, hidden):
    """The network of src/model/net.rs as an ONNX model."""
    nodes = [
        helper.make_node("Gather", ["item_embedding", "items"], ["embedded"], axis=0),
        helper.make_node("Concat", ["rows", "embedded"], ["x0"], axis=1),
    ]
    layers = len(hidden) + 1
    for i in range(layers):
        nodes.append(
            helper.make_node(
                "Gemm", [f"x{i}", f"layer{i}.weight", f"layer{i}.bias"], [f"z{i}"], transB=1
            )
        )
        last = i == layers - 1
        nodes.append(
            helper.make_node("Sigmoid" if last else "Relu", [f"z{i}"], ["scores" if last else f"x{i + 1}"])
        )
    initializers = [numpy_helper.from_array(v, name=k) for k, v in tensors.items()]
    g = helper.make_graph(
        nodes,
        "tailor_model",
        [
            helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["n", None]),
            helper.make_tensor_value_info("items", TensorProto.INT64, ["n"]),
        ],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 1])],
        initializers,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def main(export):
    export = pathlib.Path(export)
    weights = next(export.rglob("model.safetensors"))
    manifest = json.loads((weights.parent / "manifest.json").read_text())
    tensors = load_file(str(weights))
    model = graph(tensors, manifest["schema"]["architecture"]["hidden"])
    onnx.save(model, str(export / "model.onnx"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    inputs = json.loads((export / "inputs.json").read_text())
    report = {"version": manifest["version"], "onnxruntime": ort.__version__}
    for n, case in sorted(inputs.items(), key=lambda kv: int(kv[0])):
        rows = np.asarray(case["rows"], dtype=np.float32).reshape(-1, case["width"])
        items = np.asarray(case["items"], dtype=np.int64)
        feed = {"rows": rows, "items": items}
        scores = session.run(None, feed)[0].reshape(-1)
        diff = float(np.max(np.abs(scores - np.asarray(case["scores"], dtype=np.float32))))
        if diff > 1e-5:
            sys.exit(f"{n} candidates: onnxruntime and candle differ by {diff}")
        for _ in range(200):
            session.run(None, feed)
        times = []
        for _ in range(ROUNDS):
            started = time.perf_counter_ns()
            session.run(None, feed)
            times.append(time.perf_counter_ns() - started)
        report[f"candidates_{n}"] = {
            "median_us": statistics.median(times) / 1e3,
            "max_abs_diff_vs_candle": diff,
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "target/model-onnx")
