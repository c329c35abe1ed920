"""What every generated model.py shares, held once.

``hf-triton build`` copies this file beside each ``model.py`` (as ``1/hf_common.py``): Triton's
Python-backend stub puts the version folder on ``sys.path``, so ``import hf_common`` works there,
in NVIDIA's container and on Kubernetes alike, and a repository stays self-contained. The
``hf_triton`` package imports the same file (``hf_triton.templates.hf_common``) for its export,
accuracy gate and benchmark, so the tables and rules below exist exactly once.

Depends on numpy, torch, transformers, huggingface_hub and pillow only; never on Triton (model.py
turns :class:`BadInput` into a 400 and :class:`ModelError` into a load failure) nor on
``hf_triton``.
"""

import json
import os

import numpy as np

#: Written into the offline stand-in checkpoint (random weights) by ``hf_triton.checkpoints``.
STANDIN_MARKER = "HF_TRITON_STANDIN.json"

#: Task -> the transformers auto class that loads a checkpoint for it.
MODEL_CLASSES = {
    "image-feature-extraction": "AutoModel",
    "image-classification": "AutoModelForImageClassification",
    "text-feature-extraction": "AutoModel",
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "object-detection": "AutoModelForObjectDetection",
    "zero-shot-image-classification": "AutoModelForZeroShotImageClassification",
}

ZERO_SHOT = "zero-shot-image-classification"
#: The tasks vision_model.py serves (of an image-text model: its image tower).
IMAGE_TASKS = ("image-feature-extraction", "image-classification", "object-detection", ZERO_SHOT)
#: The tasks text_model.py serves (of an image-text model: its text tower).
TEXT_TASKS = ("text-feature-extraction", "text-classification", "token-classification", ZERO_SHOT)

#: What a tokenizer may produce that an encoder takes, in the order the ONNX graph lists them.
TOKENIZER_OUTPUTS = ("input_ids", "attention_mask", "token_type_ids")

#: fp32 is the reference; the others must pass the accuracy gate (hf_triton.precision).
PRECISIONS = ("fp32", "bf16", "int8", "fp16")

#: Files of a checkpoint besides its weights that serving reads (sentence-transformers modules).
CHECKPOINT_FILES = ("*.json", "*.txt", "*.model", "*.safetensors", "*_Pooling/*", "*_Dense/*")


class BadInput(ValueError):
    """A request the model cannot serve: its message goes back to that client as a 400."""


class ModelError(RuntimeError):
    """The model cannot be loaded as configured: Triton reports it with the model's name."""


# -- configuration ---------------------------------------------------------------------------


def parameters(model_config):
    """The config.pbtxt ``parameters`` as a plain dict of strings."""
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


def local_checkpoint(checkpoint, revision=None):
    """A local directory for ``checkpoint``: itself, or the hub id's snapshot.

    The launcher and the deployment files hand model.py a local directory; a hub id (the source
    repositories in NVIDIA's container) is fetched once into the Hugging Face cache, or found
    there with ``HF_HUB_OFFLINE=1``, so sentence-transformers modules are read as they are
    locally, never silently skipped.
    """
    if os.path.isdir(checkpoint):
        return checkpoint
    from huggingface_hub import snapshot_download

    return snapshot_download(
        checkpoint, revision=revision or None, allow_patterns=list(CHECKPOINT_FILES)
    )


def weights_note(checkpoint_dir):
    """How model.py describes its weights in the server log."""
    if os.path.exists(os.path.join(checkpoint_dir, STANDIN_MARKER)):
        return "OFFLINE STAND-IN, RANDOM WEIGHTS: outputs are not meaningful"
    return "pretrained weights"


def device(instance_kind, device_id):
    """The torch device of a model instance (``KIND_GPU`` -> that GPU)."""
    import torch

    if instance_kind == "GPU":
        if not torch.cuda.is_available():
            raise ModelError("instance is KIND_GPU but torch sees no CUDA device")
        return torch.device("cuda", int(device_id))
    return torch.device("cpu")


# -- precision -------------------------------------------------------------------------------


def keep_fp32(module_name):
    """Linear layers int8 leaves in fp32: the feed-forward output projection, whose input is
    GELU's output with its outliers (quantising it costs all-MiniLM-L6-v2 ~0.05 of cosine)."""
    return module_name.endswith("output.dense") and "attention" not in module_name


def quantize_int8(model):
    """Dynamic int8 with per-channel weights for every Linear layer but :func:`keep_fp32`'s."""
    import torch

    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    spec = {
        name: qconfig
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not keep_fp32(name)
    }
    return torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)


def set_torch_threads(params):
    """PyTorch's intra-op threads for this instance: the config's ``torch_threads`` (0 or
    absent: PyTorch's default, one per core). Several instances on a small CPU each using every
    core only oversubscribe it; ``hf-triton optimize`` measures the split."""
    import torch

    threads = int(params.get("torch_threads") or 0)
    if threads < 0:
        raise ModelError(f"parameter torch_threads must be >= 0, got {threads}")
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def apply_precision(model, precision, target):
    """``model`` converted to ``precision`` on device ``target``; the float dtype it takes."""
    import torch

    if precision == "fp32":
        return model, torch.float32
    if precision == "bf16":
        return model.to(torch.bfloat16), torch.bfloat16
    if precision == "fp16":
        if target.type != "cuda":
            raise ModelError("precision fp16 needs a KIND_GPU instance")
        return model.to(torch.float16), torch.float16
    if precision == "int8":
        if target.type != "cpu":
            raise ModelError("precision int8 runs on KIND_CPU instances only")
        return quantize_int8(model), torch.float32
    raise ModelError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


#: Precisions torch.compile is offered for: PyTorch's dynamic int8 modules are not compiled.
COMPILE_PRECISIONS = ("fp32", "bf16")


def wants_compile(params, precision, target):
    """The config's ``torch_compile`` ("0", the default, or "1"), checked against what it is
    offered for: fp32 and bf16 on CPU instances (measured there; not on GPUs)."""
    value = params.get("torch_compile") or "0"
    if value not in ("0", "1"):
        raise ModelError(f"parameter torch_compile must be 0 or 1, got {value!r}")
    if value == "0":
        return False
    if precision not in COMPILE_PRECISIONS:
        raise ModelError(
            f"torch_compile is offered for precision {' and '.join(COMPILE_PRECISIONS)}, "
            f"not {precision}"
        )
    if target.type != "cpu":
        raise ModelError("torch_compile runs on KIND_CPU instances (not measured on GPUs)")
    return True


def compile_model(model, warm_up, log_recompiles=True):
    """``model`` compiled by torch.compile (Inductor, shapes dynamic, weights frozen into the
    graph), and the seconds compiling took. ``log_recompiles``: from then on PyTorch logs every
    graph compiled in this process, with its reason (model.py; not the tools, whose process
    compiles one module after another).

    ``warm_up(module, batch)`` runs ``module`` on a batch of ``batch`` examples. It runs here
    for a batch of one and of two: PyTorch compiles a batch of one as a graph of its own and any
    larger batch as a second, shape-generic one, so both compile while the model loads, not
    on a client's request. Freezing (constant weights, packed for the CPU's matrix units) is
    what makes it faster than eager on CPUs; it needs ``torch.inference_mode``, which is how
    model.py runs the model. Inductor writes C++ and compiles it: a C++ compiler must be on
    the PATH (``g++``), else loading fails with this function's message.
    """
    import locale
    import time

    if locale.getpreferredencoding(False).replace("-", "").lower() != "utf8":
        # Inductor reads its code templates (UTF-8) in the locale's encoding. Triton's stub
        # embeds Python without the interpreter's C-locale coercion, so a server started with
        # no LANG reads them as ASCII and fails: read them as UTF-8, as `python` itself would.
        try:
            locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
        except locale.Error as e:
            raise ModelError(
                "torch_compile needs a UTF-8 locale: start the server with LANG=C.UTF-8"
            ) from e

    import torch
    import torch._inductor.config as inductor

    inductor.freezing = True
    compiled = torch.compile(model, dynamic=True)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for batch in (1, 2):
                warm_up(compiled, batch)
    except Exception as e:  # Dynamo's and Inductor's errors: the model cannot be served so
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ModelError(
            f"torch_compile failed ({type(e).__name__}: {first}); Inductor needs a C++ "
            "compiler (g++) on the PATH: install one, or set torch_compile to 0 to serve eager"
        ) from e
    # From here on, a graph compiled while serving (an input the warm-up did not cover:
    # another stride, a guard on some other state) stalls the instance for seconds: the log
    # says why.
    if log_recompiles:
        torch._logging.set_logs(recompiles=True)
    return compiled, time.perf_counter() - start


def describe_model(model, compile_s=None):
    """The model's class for the server log, and how long compiling it took, if it was."""
    name = type(getattr(model, "_orig_mod", model)).__name__
    return name if compile_s is None else f"{name} (torch.compile: {compile_s:.1f} s)"


# -- text ------------------------------------------------------------------------------------


def model_inputs(model, tokenizer):
    """The tokenizer outputs the model takes: produced by the tokenizer AND accepted by forward.

    RoBERTa's forward accepts ``token_type_ids`` its tokenizer never makes; DistilBERT's
    tokenizer makes them and its forward refuses them; DeBERTa-v3 takes them and ignores them
    (no type embeddings), so its ONNX graph has no such input. Only what the model uses flows.
    """
    import inspect

    accepted = inspect.signature(type(model).forward).parameters
    produced = set(tokenizer("probe").keys())
    if getattr(model.config, "type_vocab_size", None) == 0:
        produced.discard("token_type_ids")  # DeBERTa-v3: the embedding ignores them
    return [n for n in TOKENIZER_OUTPUTS if n in accepted and n in produced]


# -- token classification --------------------------------------------------------------------

#: How per-token predictions become entities: transformers' ``AggregationStrategy`` values.
AGGREGATION_STRATEGIES = ("none", "simple", "first", "average", "max")


class TokenEntities:
    """Per-token logits -> the entities transformers' token-classification pipeline reports.

    ``none``: one entry per token (``entity``, ``score``, ``index``, ``word``, ``start``,
    ``end``); ``simple``: adjacent tokens of one entity type merged (``entity_group`` and the
    mean score); ``first`` / ``average`` / ``max``: the tokens of a word first agree on one
    label (the first token's, the mean scores', the most confident token's), then words merge
    as in ``simple``. A ``B-`` tag starts a new entity; labels in ``ignore_labels`` are dropped.
    Offsets are characters of the text as received. Needs a fast tokenizer (offsets).
    """

    def __init__(self, tokenizer, id2label, strategy="simple", ignore_labels=("O",)):
        if strategy not in AGGREGATION_STRATEGIES:
            raise ModelError(
                f"aggregation_strategy {strategy!r}: one of {', '.join(AGGREGATION_STRATEGIES)}"
            )
        if not getattr(tokenizer, "is_fast", False):
            raise ModelError(
                f"token classification needs a fast tokenizer (character offsets); "
                f"{type(tokenizer).__name__} is not one"
            )
        self.tokenizer = tokenizer
        self.labels = {int(k): str(v) for k, v in id2label.items()}
        self.strategy = strategy
        self.ignore = set(ignore_labels)
        backend = getattr(getattr(tokenizer, "_tokenizer", None), "model", None)
        # WordPiece marks a word's later pieces ("##s"): a piece longer in text than as a token
        # continues a word. Others (BPE, Unigram) fall back to "no space before it".
        self.marks_subwords = bool(getattr(backend, "continuing_subword_prefix", None))

    def __call__(self, text, input_ids, offsets, special_mask, logits):
        """Entities of one text; arrays are that text's rows (padding is marked special)."""
        logits = np.asarray(logits, dtype=np.float32)
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs = shifted / shifted.sum(axis=-1, keepdims=True)
        tokens = []
        for i, (token_id, (start, end), special) in enumerate(
            zip(input_ids, offsets, special_mask, strict=True)
        ):
            if special:
                continue
            token_id, start, end = int(token_id), int(start), int(end)
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            span = text[start:end]
            if token_id == self.tokenizer.unk_token_id:
                piece, continues = span, False
            elif self.marks_subwords:
                continues = len(piece) != len(span)
            else:
                continues = start > 0 and " " not in text[start - 1 : start + 1]
            tokens.append((i, piece, probs[i], start, end, continues))

        if self.strategy in ("none", "simple"):
            found = [
                {
                    "entity": self.labels[int(p.argmax())],
                    "score": p[p.argmax()],
                    "index": i,
                    "word": piece,
                    "start": start,
                    "end": end,
                }
                for i, piece, p, start, end, _ in tokens
            ]
        else:
            found = [self._word(w) for w in self._words(tokens)]
        if self.strategy != "none":
            found = [self._group(g) for g in self._runs(found)]
        return [
            {**e, "score": float(e["score"])}
            for e in found
            if e.get("entity", e.get("entity_group")) not in self.ignore
        ]

    @staticmethod
    def _words(tokens):
        words: list = []
        for token in tokens:
            if words and token[5]:
                words[-1].append(token)
            else:
                words.append([token])
        return words

    def _word(self, word):
        if self.strategy == "first":
            p = word[0][2]
        elif self.strategy == "max":
            p = max((t[2] for t in word), key=lambda q: q.max())
        else:  # average
            p = np.nanmean(np.stack([t[2] for t in word]), axis=0)
        best = int(p.argmax())
        return {
            "entity": self.labels[best],
            "score": p[best],
            "word": self.tokenizer.convert_tokens_to_string([t[1] for t in word]),
            "start": word[0][3],
            "end": word[-1][4],
        }

    @staticmethod
    def _tag(label):
        """("B" | "I", entity type); a label without a B-/I- prefix continues."""
        if label[:2] in ("B-", "I-"):
            return label[0], label[2:]
        return "I", label

    def _runs(self, entities):
        runs: list = []
        for e in entities:
            bio, kind = self._tag(e["entity"])
            if runs and bio != "B" and self._tag(runs[-1][-1]["entity"])[1] == kind:
                runs[-1].append(e)
            else:
                runs.append([e])
        return runs

    def _group(self, run):
        return {
            "entity_group": run[0]["entity"].split("-", 1)[-1],
            "score": np.nanmean([e["score"] for e in run]),
            "word": self.tokenizer.convert_tokens_to_string([e["word"] for e in run]),
            "start": run[0]["start"],
            "end": run[-1]["end"],
        }


#: sentence-transformers' pooling modes, in the order it concatenates them.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
#: sentence-transformers modules this pipeline reproduces (by the class name in modules.json).
_ST_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")
_ACTIVATIONS = {
    "Tanh": "tanh",
    "Identity": None,
    "ReLU": "relu",
    "GELU": "gelu",
    "Sigmoid": "sigmoid",
}


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _pooling_modes(config):
    modes = config.get("pooling_mode")
    if modes is None:
        modes = [m for key, m in _LEGACY_POOLING_KEYS.items() if config.get(key)] or ["mean"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    unknown = [m for m in modes if m not in POOLING_MODES]
    if unknown:
        raise ModelError(f"pooling modes {unknown} are not among {', '.join(POOLING_MODES)}")
    return tuple(modes)


class Pooling:
    """Token embeddings -> one sentence embedding, as the checkpoint's sentence-transformers
    modules say (``modules.json``: Pooling, then any Dense layers, then Normalize).

    Without ``modules.json`` (a plain transformers checkpoint): mean pooling, no normalisation,
    the feature-extraction convention. Modules this class does not implement are refused by
    :meth:`from_checkpoint`, never skipped.
    """

    def __init__(self, modes=("mean",), dense=(), normalize=False):
        self.modes = tuple(modes)
        self.dense = list(dense)  # [(weight, bias or None, activation name or None), ...]
        self.normalize = bool(normalize)

    def to(self, target):
        """The Dense weights on device ``target`` (the model's)."""
        self.dense = [
            (w.to(target), None if b is None else b.to(target), a) for w, b, a in self.dense
        ]
        return self

    def describe(self):
        parts = ["+".join(self.modes)]
        parts += [f"dense {w.shape[1]}->{w.shape[0]}" for w, _, _ in self.dense]
        if self.normalize:
            parts.append("normalize")
        return ", ".join(parts)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir):
        modules_path = os.path.join(checkpoint_dir, "modules.json")
        if not os.path.exists(modules_path):
            return cls()
        modes, dense, normalize = ("mean",), [], False
        for module in sorted(_read_json(modules_path), key=lambda m: int(m.get("idx", 0))):
            kind = module.get("type", "").rsplit(".", 1)[-1]
            folder = os.path.join(checkpoint_dir, module.get("path", ""))
            if kind not in _ST_MODULES:
                raise ModelError(
                    f"sentence-transformers module {module.get('type')!r} is not supported; "
                    f"supported: {', '.join(_ST_MODULES)}"
                )
            if kind == "Pooling":
                config = _read_json(os.path.join(folder, "config.json"))
                if config.get("include_prompt") is False:
                    raise ModelError("Pooling with include_prompt=false (prompts) is not supported")
                modes = _pooling_modes(config)
            elif kind == "Dense":
                dense.append(_load_dense(folder))
            elif kind == "Normalize":
                normalize = True
        return cls(modes, dense, normalize)

    def __call__(self, hidden, attention_mask):
        """``hidden`` (batch, tokens, dim), ``attention_mask`` (batch, tokens) -> (batch, out)."""
        import torch

        hidden = hidden.float()  # pool in fp32 whatever the model's precision
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        # Position of the first attended token: 0 unless the tokenizer pads on the left.
        first = attention_mask.to(torch.int32).argmax(dim=1)
        pooled = []
        for mode in self.modes:
            if mode == "cls":
                index = first.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
                pooled.append(torch.gather(hidden, 1, index).squeeze(1))
            elif mode == "max":
                pooled.append(hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values)
            elif mode in ("mean", "mean_sqrt_len_tokens"):
                count = mask.sum(dim=1).clamp(min=1e-9)
                total = (hidden * mask).sum(dim=1)
                pooled.append(total / (count if mode == "mean" else torch.sqrt(count)))
            elif mode == "weightedmean":
                positions = torch.arange(
                    1, hidden.shape[1] + 1, dtype=hidden.dtype, device=hidden.device
                )
                weights = mask * (positions.view(1, -1, 1) - first.view(-1, 1, 1).to(hidden.dtype))
                total = (hidden * weights).sum(dim=1)
                pooled.append(total / weights.sum(dim=1).clamp(min=1e-9))
            elif mode == "lasttoken":
                length = hidden.shape[1]
                flipped = attention_mask.to(torch.int32).flip(1)
                values, offset = flipped.max(dim=1)
                offset = torch.where(values == 0, torch.full_like(offset, length - 1), offset)
                index = (length - 1 - offset).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
                pooled.append(torch.gather(hidden * mask, 1, index).squeeze(1))
        out = torch.cat(pooled, dim=-1)
        for weight, bias, activation in self.dense:
            out = torch.nn.functional.linear(out, weight, bias)
            if activation is not None:
                out = getattr(torch, activation)(out)
        if self.normalize:
            out = torch.nn.functional.normalize(out, p=2, dim=-1)
        return out


def _load_dense(folder):
    import torch

    config = _read_json(os.path.join(folder, "config.json"))
    if config.get("use_residual"):
        raise ModelError("Dense modules with use_residual are not supported")
    name = str(config.get("activation_function", "torch.nn.modules.activation.Tanh"))
    short = name.rsplit(".", 1)[-1]
    if short not in _ACTIVATIONS:
        raise ModelError(
            f"Dense activation {name!r} is not supported; supported: {', '.join(_ACTIVATIONS)}"
        )
    weights_path = os.path.join(folder, "model.safetensors")
    if os.path.exists(weights_path):
        from safetensors.torch import load_file

        state = load_file(weights_path)
    else:
        state = torch.load(
            os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True
        )
    weight = state["linear.weight"].float()
    bias = state.get("linear.bias")
    return weight, None if bias is None else bias.float(), _ACTIVATIONS[short]


# -- request inputs --------------------------------------------------------------------------


def decode_text(where, item, what="text"):
    """One BYTES element as UTF-8 text; :class:`BadInput` naming ``where`` (e.g.
    ``input 'text'[2]``) when it is not UTF-8 or is empty."""
    try:
        text = bytes(item).decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{where}: not valid UTF-8 ({e})") from e
    if not text.strip():
        raise BadInput(f"{where}: empty {what}")
    return text


def one_input(request, names):
    """(name, tensor) of the one input of ``names`` a request sends (the image inputs: exactly
    one per request); :class:`BadInput` naming what came otherwise."""
    import triton_python_backend_utils as pb_utils

    given = [
        (name, tensor)
        for name in names
        if (tensor := pb_utils.get_input_tensor_by_name(request, name)) is not None
    ]
    if len(given) != 1:
        raise BadInput(
            f"expected exactly one of the inputs {list(names)}, "
            f"got {[name for name, _ in given] or 'none'}"
        )
    return given[0]


# -- images ----------------------------------------------------------------------------------

IMAGE = "image"
IMAGE_UINT8 = "image_uint8"
IMAGE_BYTES = "image_bytes"
#: The three ways a request sends images: exactly one per request.
IMAGE_INPUTS = (IMAGE, IMAGE_UINT8, IMAGE_BYTES)
#: Defaults of the per-request limits (config parameters max_side_px, max_request_megapixels).
MAX_SIDE_PX = 8192
MAX_REQUEST_MEGAPIXELS = 64


def image_limits(params):
    """(longest side in px, pixels per request) from a model's config parameters."""
    max_side = int(params.get("max_side_px") or MAX_SIDE_PX)
    megapixels = float(params.get("max_request_megapixels") or MAX_REQUEST_MEGAPIXELS)
    return max_side, int(megapixels * 1e6)


def check_size(name, height, width, max_side):
    if height < 1 or width < 1:
        raise BadInput(f"input '{name}': expected H x W x 3 with H, W >= 1, got {height} x {width}")
    if max(height, width) > max_side:
        raise BadInput(
            f"input '{name}': image of {height} x {width} exceeds the {max_side} px "
            "limit per side; resize it before sending"
        )


def open_image(name, index, data):
    """An encoded image opened (only its header is read); BadInput if it is no image."""
    import io

    from PIL import Image

    if len(data) == 0:
        raise BadInput(f"input '{name}'[{index}]: empty; expected encoded image bytes")
    try:
        return Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises many types for data it cannot identify
        raise BadInput(
            f"input '{name}'[{index}]: not a decodable image ({type(e).__name__}: {e})"
        ) from e


def image_size(name, index, data, max_side):
    """(height, width) of an encoded image, from its header; checked against ``max_side``."""
    with open_image(name, index, data) as img:
        check_size(f"{name}[{index}]", img.height, img.width, max_side)
        return img.height, img.width


def check_pixels(name, images):
    """FP32 pixels: finite and in 0..255 (8-bit RGB values, as every image processor expects)."""
    if not np.isfinite(images).all():
        raise BadInput(f"input '{name}': pixel values must be finite, got NaN or Inf")
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 255.0:
        raise BadInput(
            f"input '{name}': pixel values must be in [0, 255] (RGB, H x W x 3), "
            f"got range [{low:g}, {high:g}]"
        )


def check_images(name, tensor, max_side, max_request_pixels):
    """What can be checked of a request's images before any is decoded: each encoded image's
    header and size, or an array's size and (FP32) its values, and the request's pixels against
    its budget. Returns each image's (height, width); raises :class:`BadInput`."""
    if name == IMAGE_BYTES:
        sizes = [image_size(name, i, bytes(data), max_side) for i, data in enumerate(tensor.flat)]
    else:
        check_size(name, tensor.shape[1], tensor.shape[2], max_side)
        sizes = [(int(tensor.shape[1]), int(tensor.shape[2]))] * len(tensor)
    pixels = sum(h * w for h, w in sizes)
    if pixels > max_request_pixels:
        raise BadInput(
            f"input '{name}': {pixels / 1e6:.1f} megapixels in one request exceed the "
            f"budget of {max_request_pixels / 1e6:g}; split the request"
        )
    if name == IMAGE:
        check_pixels(name, tensor)
    return sizes


# -- image-text models (CLIP, SigLIP) ----------------------------------------------------------

#: An image-text model's towers and what each serves.
EMBEDDINGS = {"image": "image_embeds", "text": "text_embeds"}
#: transformers' zero-shot-image-classification pipeline's default.
HYPOTHESIS_TEMPLATE = "This is a photo of {}."
ZERO_SHOT_SCORING = ("softmax", "sigmoid")


class Embeddings(dict):
    """A tower's outputs by name, read as attributes too (as transformers' model outputs)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def embedding_tower(model, side):
    """The ``side`` ("image" or "text") tower of an image-text ``model`` as a module whose
    output is ``image_embeds`` / ``text_embeds``: ``get_image_features`` /
    ``get_text_features``, L2-normalised as the model's own forward normalises them."""
    import torch

    if side not in EMBEDDINGS:
        raise ModelError(f"an image-text model has towers {list(EMBEDDINGS)}, not {side!r}")

    class EmbeddingTower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.config = model.config

        def forward(self, pixel_values=None, input_ids=None, attention_mask=None):
            if side == "image":
                out = self.model.get_image_features(pixel_values=pixel_values)
            else:
                out = self.model.get_text_features(
                    input_ids=input_ids, attention_mask=attention_mask
                )
            # transformers 5 returns an output object; 4.x the projected tensor itself.
            features = getattr(out, "pooler_output", out)
            embeds = features / features.norm(p=2, dim=-1, keepdim=True)
            return Embeddings({EMBEDDINGS[side]: embeds})

    return EmbeddingTower().eval()


def zero_shot_scores(logits, scoring):
    """Label scores from zero-shot logits (the last axis: the labels): "softmax" over the
    labels (CLIP) or an independent "sigmoid" per label (SigLIP)."""
    logits = np.asarray(logits, dtype=np.float64)
    if scoring == "softmax":
        exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return exp / exp.sum(axis=-1, keepdims=True)
    if scoring == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    raise ModelError(f"scoring must be one of {ZERO_SHOT_SCORING}, got {scoring!r}")


def zero_shot_ranking(logits, labels, scoring):
    """One image's logits over its candidate ``labels`` -> what transformers'
    zero-shot-image-classification pipeline returns: ``[{"score", "label"}]``, highest first
    (ties keep the labels' order). ``scoring``: "softmax" over the labels (CLIP) or an
    independent "sigmoid" per label (SigLIP)."""
    scores = zero_shot_scores(logits, scoring)
    order = sorted(range(len(labels)), key=lambda i: -scores[i])
    return [{"score": float(scores[i]), "label": labels[i]} for i in order]


# -- object detection ------------------------------------------------------------------------


def post_process_detections(processor, logits, boxes, threshold, target_sizes=None):
    """The image processor's own ``post_process_object_detection`` on numpy model outputs
    (batch first): per image, ``scores``, ``labels`` and ``boxes`` (x0, y0, x1, y1) in the
    target sizes' pixels, or in 0..1 without them."""
    import types

    import torch

    raw = types.SimpleNamespace(
        logits=torch.from_numpy(np.ascontiguousarray(logits, np.float32)),
        pred_boxes=torch.from_numpy(np.ascontiguousarray(boxes, np.float32)),
    )
    return processor.post_process_object_detection(
        raw, threshold=threshold, target_sizes=target_sizes
    )


def pipeline_detections(found, id2label, top_k=0):
    """One image's post-processed detections as transformers' object-detection pipeline
    reports them (``score``, ``label``, integer ``box``); ``top_k`` > 0: the k best, highest
    first."""
    detections = [
        {
            "score": float(score),
            "label": id2label[int(label)],
            "box": dict(zip(("xmin", "ymin", "xmax", "ymax"), box.int().tolist(), strict=True)),
        }
        for score, label, box in zip(found["scores"], found["labels"], found["boxes"], strict=True)
    ]
    if top_k:
        detections = sorted(detections, key=lambda d: -d["score"])[:top_k]
    return detections


# -- requests --------------------------------------------------------------------------------


def request_parameters(request):
    """A Triton request's parameters as a dict (empty when it has none, or on a Python backend
    too old to pass them)."""
    raw = request.parameters() if hasattr(request, "parameters") else "{}"
    return json.loads(raw or "{}")


# -- batching --------------------------------------------------------------------------------


def run_batched(requests, parse, run, dtypes):
    """One batched ``run`` for every request's items; a bad request fails alone.

    ``parse(request)`` returns a request's items or raises :class:`BadInput`; ``run(items)``
    returns ``{output name: array}`` with one row per item. Returns, per request, either
    ``(outputs, None)`` or ``(None, exception)``. When the batched run raises, each request
    runs on its own, so an input that only fails deep in the model (an id out of the
    vocabulary, an image truncated after its header) costs its own request, not its batch's.
    """
    results: list = [None] * len(requests)
    parsed = []
    for i, request in enumerate(requests):
        try:
            parsed.append((i, parse(request)))
        except BadInput as e:
            results[i] = (None, e)
    if not parsed:
        return results
    try:
        outputs = run([item for _, items in parsed for item in items])
    except Exception as e:  # reported to the clients below, never swallowed
        if len(parsed) == 1:
            results[parsed[0][0]] = (None, e)
        else:
            for i, items in parsed:
                results[i] = _run_alone(items, run, dtypes)
        return results
    start = 0
    for i, items in parsed:
        end = start + len(items)
        results[i] = (
            {
                n: np.ascontiguousarray(a[start:end].astype(dtypes[n], copy=False))
                for n, a in outputs.items()
            },
            None,
        )
        start = end
    return results


def _run_alone(items, run, dtypes):
    try:
        outputs = run(items)
    except Exception as e:  # reported to this request's client, with its type and message
        return None, e
    return {
        n: np.ascontiguousarray(a.astype(dtypes[n], copy=False)) for n, a in outputs.items()
    }, None


def respond(requests, parse, run, dtypes):
    """:func:`run_batched`, as Triton responses: BadInput -> 400, anything else -> 500."""
    import triton_python_backend_utils as pb_utils

    responses = []
    for outputs, error in run_batched(requests, parse, run, dtypes):
        if error is None:
            tensors = [pb_utils.Tensor(name, array) for name, array in outputs.items()]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        else:
            responses.append(error_response(error))
    return responses


def error_response(error):
    """A Triton response for ``error``: :class:`BadInput` -> 400 with its message; anything
    else -> 500 naming the exception's type."""
    import triton_python_backend_utils as pb_utils

    if isinstance(error, BadInput):
        triton_error = pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG)
    else:
        triton_error = pb_utils.TritonError(f"{type(error).__name__}: {error}")
    return pb_utils.InferenceResponse(error=triton_error)
