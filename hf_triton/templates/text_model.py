"""Triton Python-backend model: a Hugging Face tokenizer, optionally followed by its model.

One file, two roles, told apart by the outputs declared in config.pbtxt:

* pipeline (python_model_repository): tokenizer + model in one step; outputs are
  ``sentence_embedding`` (pooled and normalised as the checkpoint's sentence-transformers
  config says; mean pooling otherwise) or ``logits`` (classification);
* preprocessing (ensemble_model_repository): tokenizer only; outputs are the model's
  inputs (``input_ids``, ``attention_mask``, ``token_type_ids``), fed to model.onnx.

Input ``text``: BYTES, one UTF-8 text per batch item. config.pbtxt is the source of truth:
tensor names and dtypes, the checkpoint, revision, task and ``max_length``. Depends on
numpy, torch, transformers and Triton's ``triton_python_backend_utils`` only.
"""

import inspect
import json
import os

import numpy as np
import torch
import transformers
import triton_python_backend_utils as pb_utils

TEXT = "text"
TOKENIZER_OUTPUTS = ("input_ids", "attention_mask", "token_type_ids")
STANDIN_MARKER = "HF_TRITON_STANDIN.json"
#: The model class per task (same table as the build command's).
AUTO_CLASSES = {
    "text-feature-extraction": "AutoModel",
    "text-classification": "AutoModelForSequenceClassification",
}


def _quantize_int8(model):
    """Dynamic int8, per-channel weights; the feed-forward output projections (fed by GELU's
    outliers) stay fp32. The same rule as hf_triton.precision, whose gate admitted it."""
    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    spec = {
        name: qconfig
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and not (name.endswith("output.dense") and "attention" not in name)
    }
    return torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)


def _apply_precision(name, model, precision, device):
    """The model in the requested precision (token ids stay integers)."""
    if precision == "fp32":
        return model
    if precision == "bf16":
        return model.to(torch.bfloat16)
    if precision == "fp16":
        if device.type != "cuda":
            raise pb_utils.TritonModelException(f"{name}: precision fp16 needs a KIND_GPU instance")
        return model.to(torch.float16)
    if precision == "int8":
        if device.type != "cpu":
            raise pb_utils.TritonModelException(f"{name}: precision int8 runs on KIND_CPU only")
        return _quantize_int8(model)
    raise pb_utils.TritonModelException(
        f"{name}: precision must be fp32, bf16, fp16 or int8, got {precision!r}"
    )


class BadInput(ValueError):
    """A request the model cannot serve; its message goes back to the client as a 400."""


def _invalid(message):
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    )


def _pooling(checkpoint):
    """(mode, normalize) from a sentence-transformers checkpoint; ("mean", False) otherwise."""
    mode, normalize = "mean", False
    path = os.path.join(checkpoint, "1_Pooling", "config.json")
    if os.path.exists(path):
        with open(path) as f:
            cfg = json.load(f)
        if cfg.get("pooling_mode_cls_token"):
            mode = "cls"
        elif cfg.get("pooling_mode_max_tokens"):
            mode = "max"
    path = os.path.join(checkpoint, "modules.json")
    if os.path.exists(path):
        with open(path) as f:
            normalize = any(m.get("type", "").endswith(".Normalize") for m in json.load(f))
    return mode, normalize


def _decode(index, item):
    data = bytes(item)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"input '{TEXT}'[{index}]: not valid UTF-8 ({e})") from e
    if not text.strip():
        raise BadInput(f"input '{TEXT}'[{index}]: empty text")
    if "\x00" in text:
        raise BadInput(f"input '{TEXT}'[{index}]: contains a NUL character")
    return text


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.name = config["name"]
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        checkpoint = params.get("checkpoint")
        if not checkpoint:
            raise pb_utils.TritonModelException(
                f"{self.name}: config.pbtxt needs parameter 'checkpoint' (hub id or directory)"
            )
        revision = params.get("revision") or None
        task = params.get("task", "text-feature-extraction")
        if task not in AUTO_CLASSES:
            raise pb_utils.TritonModelException(
                f"{self.name}: task {task!r} is not one of {sorted(AUTO_CLASSES)}"
            )
        self.max_length = int(params.get("max_length") or 512)
        self.truncate = params.get("truncation", "true").lower() == "true"
        self.output_names = [o["name"] for o in config["output"]]
        self.output_dtypes = {
            o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]
        }

        if args["model_instance_kind"] == "GPU":
            if not torch.cuda.is_available():
                raise pb_utils.TritonModelException(
                    f"{self.name}: instance is KIND_GPU but torch sees no CUDA device"
                )
            self.device = torch.device("cuda", int(args["model_instance_device_id"]))
        else:
            self.device = torch.device("cpu")

        self.tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint, revision=revision)
        self.model = None
        self.pooling = None
        if not set(self.output_names) <= set(TOKENIZER_OUTPUTS):
            auto = getattr(transformers, AUTO_CLASSES[task])
            model = auto.from_pretrained(checkpoint, revision=revision).to(self.device).eval()
            self.model = _apply_precision(
                self.name, model, params.get("precision", "fp32"), self.device
            )
            accepted = inspect.signature(self.model.forward).parameters
            self.model_inputs = [n for n in TOKENIZER_OUTPUTS if n in accepted]
            if task == "text-feature-extraction":
                self.pooling = (
                    _pooling(checkpoint) if os.path.isdir(checkpoint) else ("mean", False)
                )

        weights = "pretrained weights"
        if os.path.exists(os.path.join(checkpoint, STANDIN_MARKER)):
            weights = "OFFLINE STAND-IN, RANDOM WEIGHTS: outputs are not meaningful"
        role = "tokenizer only"
        if self.model is not None:
            role = f"tokenizer + model in {params.get('precision', 'fp32')}"
        pb_utils.Logger.log_info(
            f"{self.name}: {role}, task {task}, checkpoint {checkpoint} ({weights}), "
            f"max_length {self.max_length}, pooling {self.pooling}, device {self.device}"
        )

    def _texts(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, TEXT)
        items = tensor.as_numpy().reshape(-1)
        texts = [_decode(i, item) for i, item in enumerate(items)]
        if not self.truncate:
            for i, text in enumerate(texts):
                n = len(self.tokenizer(text)["input_ids"])
                if n > self.max_length:
                    raise BadInput(
                        f"input '{TEXT}'[{i}]: {n} tokens, the model takes at most "
                        f"{self.max_length}"
                    )
        return texts

    def _forward(self, encoded):
        feed = {k: torch.from_numpy(encoded[k]).to(self.device) for k in self.model_inputs}
        with torch.inference_mode():
            out = self.model(**feed)
        if self.pooling is None:
            return {"logits": out.logits.float().cpu().numpy()}
        mode, normalize = self.pooling
        hidden = out.last_hidden_state.float()  # pool in fp32 whatever the model's precision
        mask = feed["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        if mode == "cls":
            pooled = hidden[:, 0]
        elif mode == "max":
            pooled = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
        else:
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return {"sentence_embedding": pooled.float().cpu().numpy()}

    def execute(self, requests):
        responses = [None] * len(requests)
        texts, owners = [], []
        for i, request in enumerate(requests):
            try:
                batch = self._texts(request)
            except BadInput as e:
                responses[i] = _invalid(str(e))
                continue
            texts.extend(batch)
            owners.append((i, len(batch)))
        if not texts:
            return responses

        # One tokenizer call and one forward pass for every text of every request.
        encoded = dict(
            self.tokenizer(
                texts,
                padding=True,
                truncation=self.truncate,
                max_length=self.max_length,
                return_tensors="np",
            )
        )
        outputs = self._forward(encoded) if self.model is not None else encoded

        start = 0
        for i, count in owners:
            responses[i] = pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(
                        name,
                        np.ascontiguousarray(
                            outputs[name][start : start + count].astype(self.output_dtypes[name])
                        ),
                    )
                    for name in self.output_names
                ]
            )
            start += count
        return responses
