"""A Python-based Triton backend named ``onnxruntime`` that serves ``model.onnx``.

The ``nvidia-pytriton`` wheel bundles Triton without NVIDIA's C++ ONNX Runtime
backend. Triton loads a directory ``<backends>/onnxruntime/model.py`` as a
Python-based backend of that name, so a model directory holding only
``1/model.onnx`` is served here exactly as NVIDIA's container serves it:

* ``auto_complete_config`` fills inputs, outputs, ``max_batch_size`` and dynamic
  batching from the ONNX graph, following the native backend's rules (a model
  batches when dimension 0 of every input and output is dynamic; then
  ``max_batch_size`` becomes ``--backend-config=default-max-batch-size``, 4 when
  unset, and the dynamic batcher is enabled);
* ``execute`` gathers every request of a batch into one session run and splits
  the results back; when that run fails, each request runs on its own, so one request's
  bad input (a token id outside the vocabulary) fails that request alone, with a 400.

Session options are read from the model config's ``parameters`` under the names
NVIDIA's backend uses (``intra_op_thread_count``, ``inter_op_thread_count``,
``execution_mode``) plus ``graph_optimization_level`` and ONNX Runtime's own session options
under their keys (``session.intra_op.allow_spinning``, ...), and ``intra_op_spinning``
(``auto``: the spinning this machine's CPU kind measured fastest, see :func:`_spinning`); the
CUDA execution provider is used for KIND_GPU instances when ``onnxruntime-gpu`` is installed.
"""

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

#: ONNX Runtime session options that are switches ("0"/"1"); it accepts any other value silently.
_SWITCHES = (
    "session.intra_op.allow_spinning",
    "session.inter_op.allow_spinning",
    "session.force_spinning_stop",
)

_ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.INT16: "TYPE_INT16",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.UINT16: "TYPE_UINT16",
    onnx.TensorProto.UINT32: "TYPE_UINT32",
    onnx.TensorProto.UINT64: "TYPE_UINT64",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
    onnx.TensorProto.STRING: "TYPE_STRING",
}
_NATIVE_DEFAULT_MAX_BATCH_SIZE = 4

#: ``intra_op_spinning``: what ONNX Runtime's intra-op threads do while they wait for work, as
#: ONNX Runtime's own session options. Within a run they spin between operators and sleep once
#: it ends (left spinning after it, they stalled other steps' requests by ~0.5 s on 2 cores).
_SPINNING = {
    "never": {"session.intra_op.allow_spinning": "0"},
    "within_run": {"session.force_spinning_stop": "1"},
}
_SPIN_KEYS = ("session.intra_op.allow_spinning", "session.force_spinning_stop")


def _cpu_flags():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _spinning(value, gpu):
    """(spinning, why) for ``intra_op_spinning``. ``auto``: within a run on a CPU with AMX, where
    every model measured served faster so (ViT-base fp32 and int8: 5-8 ms less per request at
    concurrency 1; all-MiniLM-L6-v2: ~15% more sentences/s at 1; README, "Throughput"); never
    elsewhere (all-MiniLM-L6-v2 was slower spinning on the AVX2 kind) and on GPU instances."""
    if value != "auto":
        return value, "as configured"
    if not gpu and "amx_tile" in _cpu_flags():
        return "within_run", "auto: this CPU has AMX"
    return "never", "auto: GPU instance" if gpu else "auto: this CPU has no AMX"


_GRAPH_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_EXECUTION_MODES = {
    "sequential": ort.ExecutionMode.ORT_SEQUENTIAL,
    "parallel": ort.ExecutionMode.ORT_PARALLEL,
    "0": ort.ExecutionMode.ORT_SEQUENTIAL,  # NVIDIA's backend spells it 0/1
    "1": ort.ExecutionMode.ORT_PARALLEL,
}


def _stub_model_path():
    # auto_complete_config receives only the config; the stub process is started with
    # the model file of the version being loaded as its first argument.
    with open("/proc/self/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    if len(argv) < 2 or not argv[1]:
        raise pb_utils.TritonModelException("cannot locate model.onnx: stub has no model path")
    return os.fsdecode(argv[1])


def _server_default_max_batch_size():
    # Honour `--backend-config=[onnxruntime,]default-max-batch-size=N` like the native backend.
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            argv = os.fsdecode(f.read()).split("\0")
    except OSError:
        return _NATIVE_DEFAULT_MAX_BATCH_SIZE
    value = _NATIVE_DEFAULT_MAX_BATCH_SIZE
    for arg in argv:
        if arg.startswith("--backend-config="):
            setting = arg.split("=", 1)[1]
            backend, _, kv = setting.rpartition(",")
            key, _, val = kv.partition("=")
            if backend in ("", "onnxruntime") and key == "default-max-batch-size":
                value = int(val)
    return value


def _value_infos(graph):
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    return inputs, list(graph.output)


def _dims(value_info):
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else -1 for d in shape.dim]


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        config = auto_complete_model_config.as_dict()
        path = _stub_model_path()
        graph = onnx.load(path, load_external_data=False).graph
        inputs, outputs = _value_infos(graph)
        tensors = inputs + outputs
        batching = bool(tensors) and all(len(_dims(t)) > 0 and _dims(t)[0] == -1 for t in tensors)
        max_batch_size = config.get("max_batch_size", 0)
        if max_batch_size == 0 and batching:
            max_batch_size = _server_default_max_batch_size()
            auto_complete_model_config.set_max_batch_size(max_batch_size)
            if not config.get("sequence_batching") and not config.get("dynamic_batching"):
                auto_complete_model_config.set_dynamic_batching()
        offset = 1 if max_batch_size > 0 else 0

        declared_in = {i["name"] for i in config.get("input", [])}
        declared_out = {o["name"] for o in config.get("output", [])}
        for vi, declared, add in (
            *((vi, declared_in, auto_complete_model_config.add_input) for vi in inputs),
            *((vi, declared_out, auto_complete_model_config.add_output) for vi in outputs),
        ):
            if vi.name in declared:
                continue
            elem = vi.type.tensor_type.elem_type
            if elem not in _ONNX_TO_TRITON:
                raise pb_utils.TritonModelException(
                    f"{path}: tensor '{vi.name}' has ONNX element type {elem}, not servable"
                )
            add({"name": vi.name, "data_type": _ONNX_TO_TRITON[elem], "dims": _dims(vi)[offset:]})
        return auto_complete_model_config

    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        filename = config.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        if not os.path.exists(path):
            raise pb_utils.TritonModelException(
                f"{config['name']}: {path} does not exist - run ./export.sh to create it"
            )

        options = ort.SessionOptions()
        intra = int(params.get("intra_op_thread_count", "0") or 0)
        inter = int(params.get("inter_op_thread_count", "0") or 0)
        if intra:
            options.intra_op_num_threads = intra
        if inter:
            options.inter_op_num_threads = inter
        mode = params.get("execution_mode", "sequential").lower()
        level = params.get("graph_optimization_level", "all").lower()
        if mode not in _EXECUTION_MODES or level not in _GRAPH_LEVELS:
            raise pb_utils.TritonModelException(
                f"{config['name']}: execution_mode must be one of {sorted(_EXECUTION_MODES)} and "
                f"graph_optimization_level one of {sorted(_GRAPH_LEVELS)}; "
                f"got {mode!r}, {level!r}"
            )
        options.execution_mode = _EXECUTION_MODES[mode]
        # ONNX Runtime's own session options under their own keys ("session.*", as NVIDIA's
        # backend takes session.use_device_allocator_for_initializers), e.g.
        # session.intra_op.allow_spinning; intra_op_spinning (what the generated configs set,
        # "auto") is turned into one of them here.
        entries = {k: v for k, v in sorted(params.items()) if k.startswith("session.")}
        spin_note = ""
        if "intra_op_spinning" in params:
            value = params["intra_op_spinning"].replace("-", "_")  # build's spelling too
            if value not in ("auto", *_SPINNING):
                raise pb_utils.TritonModelException(
                    f"{config['name']}: parameter intra_op_spinning must be auto, never or "
                    f"within_run, not {params['intra_op_spinning']!r}"
                )
            explicit = [k for k in _SPIN_KEYS if k in entries]
            if explicit:
                raise pb_utils.TritonModelException(
                    f"{config['name']}: parameter intra_op_spinning and ONNX Runtime's own "
                    f"{', '.join(explicit)} both set how its threads spin; keep one"
                )
            spinning, why = _spinning(value, args["model_instance_kind"] == "GPU")
            entries.update(_SPINNING[spinning])
            spin_note = f", intra_op_spinning={spinning} ({why})"
        for key, value in entries.items():
            if key in _SWITCHES and value not in ("0", "1"):
                raise pb_utils.TritonModelException(
                    f"{config['name']}: parameter {key} must be 0 or 1, not {value!r} "
                    "(ONNX Runtime would silently read anything but 1 as 0)"
                )
            options.add_session_config_entry(key, value)
        options.graph_optimization_level = _GRAPH_LEVELS[level]

        providers = ["CPUExecutionProvider"]
        if args["model_instance_kind"] == "GPU":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise pb_utils.TritonModelException(
                    f"{config['name']}: instance is KIND_GPU but onnxruntime has no CUDA "
                    "execution provider; install onnxruntime-gpu or use KIND_CPU"
                )
            device = int(args["model_instance_device_id"])
            providers = [("CUDAExecutionProvider", {"device_id": device}), "CPUExecutionProvider"]
        self.session = ort.InferenceSession(path, sess_options=options, providers=providers)
        self.batching = config.get("max_batch_size", 0) > 0
        self.inputs = [
            (i["name"], pb_utils.triton_string_to_numpy(i["data_type"])) for i in config["input"]
        ]
        self.outputs = [o["name"] for o in config["output"]]
        pb_utils.Logger.log_info(
            f"{config['name']}: {path} on {self.session.get_providers()[0]}, "
            f"intra_op_threads={intra or 'default'}, execution_mode={mode}, graph_opt={level}"
            + "".join(f", {k}={v}" for k, v in sorted(entries.items()))
            + spin_note
        )

    def execute(self, requests):
        feeds = []
        for request in requests:
            feeds.append(
                {
                    name: pb_utils.get_input_tensor_by_name(request, name)
                    .as_numpy()
                    .astype(dtype, copy=False)
                    for name, dtype in self.inputs
                }
            )
        if not self.batching:
            return [self._respond(lambda f=feed: self._run(f)) for feed in feeds]
        try:
            if len(feeds) == 1:  # nothing to gather: no copy
                batch = feeds[0]
            else:
                batch = {name: np.concatenate([f[name] for f in feeds]) for name, _ in self.inputs}
            results = self._run(batch)
        except Exception:  # one request's input failed them all: run each on its own
            if len(feeds) == 1:
                return [self._respond(lambda: self._run(feeds[0]))]
            return [self._respond(lambda f=feed: self._run(f)) for feed in feeds]
        splits = np.cumsum([len(next(iter(f.values()))) for f in feeds])[:-1]
        per_output = [np.split(r, splits) for r in results]
        return [
            pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(name, per_output[j][i]) for j, name in enumerate(self.outputs)
                ]
            )
            for i in range(len(feeds))
        ]

    def _run(self, feed):
        return self.session.run(self.outputs, feed)

    def _respond(self, run):
        """One request's response: its outputs, or its error (ONNX Runtime's invalid-argument
        errors, e.g. a token id outside the vocabulary, are the client's: 400)."""
        try:
            results = run()
        except Exception as e:  # reported to this request's client with ONNX Runtime's message
            code = pb_utils.TritonError.INTERNAL
            if type(e).__name__ in ("InvalidArgument", "InvalidGraph"):
                code = pb_utils.TritonError.INVALID_ARG
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), code))
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor(name, results[j]) for j, name in enumerate(self.outputs)
            ]
        )
