"""Triton Python-backend model: a Hugging Face tokenizer, optionally followed by its model.

One file, two roles, told apart by the outputs declared in config.pbtxt:

* pipeline (python_model_repository): tokenizer + model in one step; outputs are
  ``sentence_embedding`` (pooled, projected and normalised as the checkpoint's
  sentence-transformers modules say; mean pooling otherwise) or ``logits`` (classification);
* preprocessing (ensemble_model_repository): tokenizer only; outputs are the model's
  inputs (``input_ids``, ``attention_mask``, and ``token_type_ids`` when the model takes them),
  fed to model.onnx.

Input ``text``: BYTES, one UTF-8 text per batch item. config.pbtxt is the source of truth:
tensor names and dtypes, the checkpoint, revision, task and ``max_length``. Depends on numpy,
torch, transformers, Triton's ``triton_python_backend_utils`` and ``hf_common.py`` beside it.
"""

import json

import hf_common
import numpy as np
import triton_python_backend_utils as pb_utils
from hf_common import BadInput, ModelError

TEXT = "text"


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
        try:
            self._initialize(args, config)
        except ModelError as e:
            raise pb_utils.TritonModelException(f"{self.name}: {e}") from e

    def _initialize(self, args, config):
        import transformers  # here, not at the top: Triton also imports model.py just to
        # auto-complete its config, in a process of its own that never serves

        params = hf_common.parameters(config)
        checkpoint = params.get("checkpoint")
        if not checkpoint:
            raise ModelError("config.pbtxt needs parameter 'checkpoint' (hub id or directory)")
        revision = params.get("revision") or None
        task = params.get("task", "text-feature-extraction")
        if task not in hf_common.MODEL_CLASSES or not task.startswith("text"):
            raise ModelError(
                f"task {task!r} is not a text task of {sorted(hf_common.MODEL_CLASSES)}"
            )
        self.max_length = int(params.get("max_length") or 512)
        self.truncate = params.get("truncation", "true").lower() == "true"
        self.output_names = [o["name"] for o in config["output"]]
        self.output_dtypes = {
            o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]
        }
        self.device = hf_common.device(
            args["model_instance_kind"], args["model_instance_device_id"]
        )
        local = hf_common.local_checkpoint(checkpoint, revision)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(local)
        self.model = None
        self.pooling = None
        precision = params.get("precision", "fp32")
        if not set(self.output_names) <= set(hf_common.TOKENIZER_OUTPUTS):
            auto = getattr(transformers, hf_common.MODEL_CLASSES[task])
            model = auto.from_pretrained(local).to(self.device).eval()
            self.model_inputs = hf_common.model_inputs(model, self.tokenizer)
            self.model, _ = hf_common.apply_precision(model, precision, self.device)
            if task == "text-feature-extraction":
                self.pooling = hf_common.Pooling.from_checkpoint(local).to(self.device)
        else:
            produced = set(self.tokenizer("probe").keys())
            missing = [n for n in self.output_names if n not in produced]
            if missing:
                raise ModelError(
                    f"config.pbtxt declares outputs {missing} that "
                    f"{type(self.tokenizer).__name__} does not produce; it produces "
                    f"{sorted(produced)}"
                )

        role = "tokenizer only"
        if self.model is not None:
            role = f"tokenizer + {type(self.model).__name__} in {precision}"
        pooling = f", pooling {self.pooling.describe()}" if self.pooling else ""
        pb_utils.Logger.log_info(
            f"{self.name}: {role}, task {task}, checkpoint {checkpoint} "
            f"({hf_common.weights_note(local)}), max_length {self.max_length}{pooling}, "
            f"device {self.device}"
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

    def _run(self, texts):
        # One tokenizer call and one forward pass for every text of every request.
        encoded = self.tokenizer(
            texts,
            padding=True,
            truncation=self.truncate,
            max_length=self.max_length,
            return_tensors="np",
        )
        if self.model is None:
            return {name: encoded[name].astype(np.int64) for name in self.output_names}
        import torch

        feed = {k: torch.from_numpy(encoded[k]).to(self.device) for k in self.model_inputs}
        with torch.inference_mode():
            out = self.model(**feed)
        if self.pooling is None:
            return {"logits": out.logits.float().cpu().numpy()}
        mask = torch.from_numpy(encoded["attention_mask"]).to(self.device)
        pooled = self.pooling(out.last_hidden_state, mask)
        return {"sentence_embedding": pooled.cpu().numpy()}

    def execute(self, requests):
        return hf_common.respond(requests, self._texts, self._run, self.output_dtypes)
