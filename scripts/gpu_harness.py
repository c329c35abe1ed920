"""Fallback of scripts/gpu_check.sh where Triton's Python-backend stub cannot start (no shared
libpython for that machine's Python): each generated model.py is driven as the stub drives
it -- ``initialize(args)`` with the instance's kind and device, then ``execute(requests)`` --
with a minimal stand-in for ``triton_python_backend_utils``. Same repositories and the same
comparisons as tests/test_gpu.py; prints one line per check and exits 1 if one fails.

    python scripts/gpu_harness.py ROOT [--cpu]   # builds its inputs under ROOT first (--cpu:
                                                 # CPU instances, bf16 for fp16: a self-check)
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class _Error(Exception):
    INVALID_ARG = "INVALID_ARG"

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


class _Response:
    def __init__(self, output_tensors=(), error=None):
        self.outputs, self.error_ = {t.name(): t.as_numpy() for t in output_tensors}, error


class _Request:
    def __init__(self, **inputs):
        self.inputs = {k: _Tensor(k, v) for k, v in inputs.items()}

    def parameters(self):
        return "{}"


def _pb_utils() -> types.ModuleType:
    from hf_triton.templates import hf_common  # noqa: F401 - importable beside model.py

    m = types.ModuleType("triton_python_backend_utils")
    m.Tensor, m.InferenceResponse, m.TritonError = _Tensor, _Response, _Error
    m.TritonModelException = RuntimeError
    m.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    m.triton_string_to_numpy = lambda t: np.dtype(
        {"TYPE_FP32": "float32", "TYPE_FP16": "float16", "TYPE_STRING": "object"}.get(t, "int64")
    )
    m.Logger = types.SimpleNamespace(
        log_info=lambda msg: print("   [model]", msg),
        log_warn=lambda msg: print("   [model] WARN", msg),
        log_error=lambda msg: print("   [model] ERROR", msg),
        log_verbose=lambda msg: None,
    )
    return m


def load(model_dir: Path):
    """model.py of ``model_dir`` initialised as the stub does, on the config's instance kind."""
    from google.protobuf import json_format

    from hf_triton.bench import load_model_py
    from hf_triton.serve import read_config

    cfg = read_config(model_dir / "config.pbtxt")
    config = json_format.MessageToDict(cfg, preserving_proto_field_name=True)
    for section in ("input", "output"):  # Triton's JSON has numbers where protobuf's has str
        for tensor in config.get(section, []):
            tensor["dims"] = [int(d) for d in tensor.get("dims", [])]
    kind = config["instance_group"][0].get("kind", "KIND_CPU").removeprefix("KIND_")
    model = load_model_py(model_dir / "1" / "model.py").TritonPythonModel()
    model.initialize(
        {
            "model_config": json.dumps(config),
            "model_instance_kind": kind,
            "model_instance_device_id": "0",
            "model_name": config["name"],
        }
    )
    return model


def run(model, **inputs) -> dict[str, np.ndarray]:
    (response,) = model.execute([_Request(**inputs)])
    if response.error_ is not None:
        raise RuntimeError(str(response.error_))
    return response.outputs


def _cos(a, b) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def prepare(root: Path, cpu: bool = False) -> None:
    """The checkpoints, photo and five repositories the checks use, built as a user builds
    them (``cpu``: KIND_CPU instances, bf16 standing in for fp16, to check the harness itself
    on a machine without a GPU)."""
    import shutil

    from hf_triton.build import BuildOptions, build
    from hf_triton.checkpoints import build_vit_checkpoint
    from hf_triton.families import FAMILIES
    from hf_triton.spec import ModelSpec

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import PHOTO, TINY_VIT

    root.mkdir(parents=True, exist_ok=True)
    vit = build_vit_checkpoint(root / "tiny-vit", seed=0, **TINY_VIT)
    text = FAMILIES["bert"].make(root / "bert", "text-feature-extraction")
    shutil.copyfile(PHOTO, root / "photo.jpg")
    kind, half = ("KIND_CPU", "bf16") if cpu else ("KIND_GPU", "fp16")
    for name, ckpt, prec, where in (
        ("vit32", vit, "fp32", kind),
        ("vit16", vit, half, kind),
        ("txt32", text, "fp32", kind),
        ("txt16", text, half, kind),
        ("txtcpu", text, "fp32", "KIND_CPU"),
    ):
        options = BuildOptions(name=name, precision=prec, instance_kind=where)
        build(ModelSpec.resolve(ckpt), root / name, "python", options, False)


def main(root: Path) -> int:
    sys.modules["triton_python_backend_utils"] = _pb_utils()
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, ViTModel

    photo = np.asarray(Image.open(root / "photo.jpg").convert("RGB"), dtype=np.float32)
    vit = root / "tiny-vit"
    pixels = AutoImageProcessor.from_pretrained(vit, backend="pil")(
        images=[Image.fromarray(photo.astype(np.uint8))], return_tensors="pt"
    )["pixel_values"]
    with torch.inference_mode():
        ref = ViTModel.from_pretrained(vit).eval()(pixel_values=pixels)
    want = {"last_hidden_state": ref.last_hidden_state.numpy(), "pooler_output": ref.pooler_output}
    texts = np.array([[s.encode()] for s in ("A man is eating food.", "Hi")], dtype=object)
    failed = 0

    def check(what: str, ok: bool, detail: str) -> None:
        nonlocal failed
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {what}: {detail}", flush=True)

    repo = "python_model_repository"
    for name, bound in (("vit32", None), ("vit16", 0.999)):
        got = run(load(root / name / repo / f"python_{name}"), image=photo[None])
        for out, value in want.items():
            value = np.asarray(value)
            what = f"{name} {out} on its instance vs transformers on the cpu"
            if bound is None:
                diff = float(np.abs(got[out] - value).max())
                check(what, diff <= 1e-3, f"max |diff| {diff:.2e}")
            else:
                cos = _cos(got[out][0], value[0])
                check(what, cos >= bound, f"cos {cos:.6f}")
    cpu = run(load(root / "txtcpu" / repo / "python_txtcpu"), text=texts)["sentence_embedding"]
    t32 = run(load(root / "txt32" / repo / "python_txt32"), text=texts)["sentence_embedding"]
    t16 = run(load(root / "txt16" / repo / "python_txt16"), text=texts)["sentence_embedding"]
    diff = float(np.abs(t32 - cpu).max())
    check("txt32 on its instance vs the cpu instance", diff <= 1e-3, f"max |diff| {diff:.2e}")
    cos = _cos(t16, cpu)
    check("txt16 on its instance vs the cpu instance", cos >= 0.999, f"cos {cos:.6f}")
    return 1 if failed else 0


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--cpu"]
    if not (Path(args[0]) / "txtcpu").exists():
        prepare(Path(args[0]), cpu="--cpu" in sys.argv)
    raise SystemExit(main(Path(args[0])))
