"""Triton Python-backend model: a Hugging Face tokenizer, optionally followed by its model.

One file, two roles, told apart by the outputs declared in config.pbtxt:

* pipeline (python_model_repository): tokenizer + model in one step; outputs are
  ``sentence_embedding`` (pooled, projected and normalised as the checkpoint's
  sentence-transformers modules say; mean pooling otherwise), ``logits`` (classification)
  or ``text_embeds`` (an image-text model's text tower, CLIP's or SigLIP's, L2-normalised);
* preprocessing (ensemble_model_repository): tokenizer only; outputs are the model's
  inputs (``input_ids``, ``attention_mask``, and ``token_type_ids`` when the model takes them),
  fed to model.onnx (plus ``offset_mapping`` and ``special_tokens_mask`` for token tasks);
* postprocessing (token classification's third ensemble step): inputs ``text``, ``input_ids``,
  the offsets and model.onnx's per-token ``logits``; output ``entities``.

Token classification outputs ``entities``: one JSON list per text, the entities transformers'
token-classification pipeline reports (``hf_common.TokenEntities``), grouped by the config's
``aggregation_strategy`` or the request parameter of that name.

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
#: What the tokenizer step adds for a post-processing step: where each token is in the text.
OFFSETS = ("offset_mapping", "special_tokens_mask")


def _decode(index, item):
    text = hf_common.decode_text(f"input '{TEXT}'[{index}]", item)
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
        if task not in hf_common.TEXT_TASKS:
            raise ModelError(f"task {task!r} is not a text task of {list(hf_common.TEXT_TASKS)}")
        self.max_length = int(params.get("max_length") or 512)
        self.truncate = params.get("truncation", "true").lower() == "true"
        # "longest": a batch is padded to its longest text; "max_length": every text to
        # max_length (SigLIP's text tower pools the last position and takes no mask).
        self.padding = params.get("padding") or "longest"
        if self.padding not in ("longest", "max_length"):
            raise ModelError(
                f"parameter padding must be longest or max_length, not {self.padding!r}"
            )
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
        self.entities = None
        input_names = [i["name"] for i in config["input"]]
        self.postprocess_only = "logits" in input_names
        precision = params.get("precision", "fp32")
        if task == "token-classification":
            id2label = transformers.AutoConfig.from_pretrained(local).id2label
            self.strategy = params.get("aggregation_strategy") or "simple"
            if self.strategy not in hf_common.AGGREGATION_STRATEGIES:
                raise ModelError(
                    f"parameter aggregation_strategy {self.strategy!r}: one of "
                    f"{', '.join(hf_common.AGGREGATION_STRATEGIES)}"
                )
            ignore = tuple(x for x in params.get("ignore_labels", "O").split(",") if x)
            # One per strategy: a request may ask for any of them.
            self.entities = {
                s: hf_common.TokenEntities(self.tokenizer, id2label, s, ignore)
                for s in hf_common.AGGREGATION_STRATEGIES
            }
        if self.postprocess_only:
            role = "postprocessing: logits -> entities"
            if self.entities is None:
                raise ModelError(f"inputs {input_names}: a logits input needs token-classification")
        elif not set(self.output_names) <= set(hf_common.TOKENIZER_OUTPUTS + OFFSETS):
            auto = getattr(transformers, hf_common.MODEL_CLASSES[task])
            model = auto.from_pretrained(local).to(self.device).eval()
            if task == hf_common.ZERO_SHOT:  # an image-text model's text tower
                model = hf_common.embedding_tower(model, "text")
            self.model_inputs = hf_common.model_inputs(model, self.tokenizer)
            self.model, _ = hf_common.apply_precision(model, precision, self.device)
            self.threads = hf_common.set_torch_threads(params)
            compile_s = None
            if hf_common.wants_compile(params, precision, self.device):
                self.model, compile_s = hf_common.compile_model(self.model, self._warm_up)
            if task == "text-feature-extraction":
                self.pooling = hf_common.Pooling.from_checkpoint(local).to(self.device)
            role = (
                f"tokenizer + {hf_common.describe_model(self.model, compile_s)} in {precision}, "
                f"{self.threads} torch threads"
            )
        else:
            produced = set(self.tokenizer("probe").keys()) | set(OFFSETS)
            missing = [n for n in self.output_names if n not in produced]
            if missing:
                raise ModelError(
                    f"config.pbtxt declares outputs {missing} that "
                    f"{type(self.tokenizer).__name__} does not produce; it produces "
                    f"{sorted(produced)}"
                )
            role = "tokenizer only"
        pooling = f", pooling {self.pooling.describe()}" if self.pooling else ""
        if self.entities is not None:
            pooling += f", aggregation {self.strategy}"
        pb_utils.Logger.log_info(
            f"{self.name}: {role}, task {task}, checkpoint {checkpoint} "
            f"({hf_common.weights_note(local)}), max_length {self.max_length}{pooling}, "
            f"device {self.device}"
        )

    def _strategy(self, request):
        """The request's aggregation_strategy parameter, else the config's."""
        if self.entities is None:
            return None
        strategy = hf_common.request_parameters(request).get("aggregation_strategy", self.strategy)
        if not isinstance(strategy, str) or strategy not in self.entities:
            raise BadInput(
                f"parameter aggregation_strategy {strategy!r}: one of "
                f"{', '.join(hf_common.AGGREGATION_STRATEGIES)}"
            )
        return strategy

    def _postprocess_items(self, request):
        """One (text, strategy, ids, offsets, special mask, logits) per row of a request."""

        def get(name):
            return pb_utils.get_input_tensor_by_name(request, name).as_numpy()

        texts = [_decode(i, t) for i, t in enumerate(get(TEXT).reshape(-1))]
        strategy = self._strategy(request)
        ids, offsets, special, logits = (
            get(n) for n in ("input_ids", "offset_mapping", "special_tokens_mask", "logits")
        )
        return [
            (text, strategy, ids[j], offsets[j], special[j], logits[j])
            for j, text in enumerate(texts)
        ]

    def _entities(self, rows):
        """{"entities": (N, 1) JSON per text} from per-row (text, strategy, arrays...)."""
        out = np.empty((len(rows), 1), dtype=object)
        for j, (text, strategy, *arrays) in enumerate(rows):
            found = self.entities[strategy](text, *arrays)
            out[j, 0] = json.dumps(found, ensure_ascii=False).encode("utf-8")
        return {"entities": out}

    def _texts(self, request):
        if self.postprocess_only:
            return self._postprocess_items(request)
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
        if self.entities is not None:  # each text carries its request's strategy
            strategy = self._strategy(request)
            return [(text, strategy) for text in texts]
        return texts

    def _encode(self, texts, **kwargs):
        return self.tokenizer(
            texts,
            padding=True if self.padding == "longest" else self.padding,
            truncation=self.truncate,
            max_length=self.max_length,
            return_tensors="np",
            **kwargs,
        )

    def _warm_up(self, module, batch):
        """``module`` on ``batch`` copies of a short sentence, as _run feeds it."""
        import torch

        encoded = self._encode(["A sentence to compile the model with."] * batch)
        module(**{k: torch.from_numpy(encoded[k]).to(self.device) for k in self.model_inputs})

    def _run(self, items):
        if self.postprocess_only:
            return self._entities(items)
        texts = [t[0] for t in items] if self.entities is not None else items
        # One tokenizer call and one forward pass for every text of every request.
        encoded = self._encode(
            texts,
            return_offsets_mapping=self.entities is not None,
            return_special_tokens_mask=self.entities is not None,
        )
        if self.model is None:
            return {name: encoded[name].astype(np.int64) for name in self.output_names}
        import torch

        with torch.inference_mode():  # the inputs too, as the warm-up makes them: a compiled
            # model's guards tell inference tensors from others (a graph each, ~10 s apiece)
            feed = {k: torch.from_numpy(encoded[k]).to(self.device) for k in self.model_inputs}
            out = self.model(**feed)
        if self.entities is not None:
            logits = out.logits.float().cpu().numpy()
            rows = [
                (text, strategy, *(encoded[n][j] for n in ("input_ids", *OFFSETS)), logits[j])
                for j, (text, strategy) in enumerate(items)
            ]
            return self._entities(rows)
        if self.pooling is None:  # logits, or an image-text model's text_embeds
            return {n: getattr(out, n).float().cpu().numpy() for n in self.output_names}
        mask = torch.from_numpy(encoded["attention_mask"]).to(self.device)
        pooled = self.pooling(out.last_hidden_state, mask)
        return {"sentence_embedding": pooled.cpu().numpy()}

    def execute(self, requests):
        return hf_common.respond(requests, self._texts, self._run, self.output_dtypes)
