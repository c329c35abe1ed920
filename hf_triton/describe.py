"""Inputs and outputs of a model.onnx file or of a served model: what Netron would show."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hf_triton.errors import HfTritonError


class DescribeError(HfTritonError):
    """The file or the served model cannot be read."""


@dataclass
class Description:
    title: str
    #: (kind, name, datatype, shape); kind is "input", "input (optional)" or "output".
    tensors: list[tuple[str, str, str, str]] = field(default_factory=list)

    def text(self) -> str:
        lines = [self.title]
        lines += [f"  {k:<18} {n:<22} {d:<8} {s}" for k, n, d, s in self.tensors]
        return "\n".join(lines)


def describe(target: str, url: str = "127.0.0.1:8000") -> Description:
    """``target``: a path to a .onnx file, or the name of a model served at ``url`` (HTTP)."""
    if target.endswith(".onnx") or Path(target).is_file():
        return _describe_onnx(Path(target))
    return _describe_served(target, url)


def _describe_onnx(path: Path) -> Description:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (OSError, DecodeError) as e:
        raise DescribeError(f"cannot read {path}: {e}") from e
    graph = proto.graph
    initializers = {i.name for i in graph.initializer}

    def shape(vi) -> str:
        dims = vi.type.tensor_type.shape.dim
        return "[" + ", ".join(d.dim_param or str(d.dim_value) for d in dims) + "]"

    def dtype(vi) -> str:
        return onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type)

    opsets = ", ".join(str(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    title = f"{path}: opset {opsets}; " + "; ".join(f"{k}={v}" for k, v in meta.items())
    tensors = [
        ("input", i.name, dtype(i), shape(i)) for i in graph.input if i.name not in initializers
    ]
    tensors += [("output", o.name, dtype(o), shape(o)) for o in graph.output]
    return Description(title, tensors)


def _describe_served(model: str, url: str) -> Description:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(url=url)
    try:
        meta = client.get_model_metadata(model)
        config = client.get_model_config(model)
    except (InferenceServerException, OSError) as e:
        raise DescribeError(f"cannot read model '{model}' at {url}: {e}") from e
    finally:
        client.close()
    batch = int(config.get("max_batch_size", 0))
    optional = {i["name"] for i in config.get("input", []) if i.get("optional")}
    tensors = [
        (
            "input" + (" (optional)" if i["name"] in optional else ""),
            i["name"],
            i["datatype"],
            str(i["shape"]),
        )
        for i in meta["inputs"]
    ]
    tensors += [("output", o["name"], o["datatype"], str(o["shape"])) for o in meta["outputs"]]
    title = (
        f"{model} at {url}: platform {meta.get('platform')}, "
        f"max_batch_size {batch} (-1 in shapes: variable; the first is the batch)"
    )
    return Description(title, tensors)
