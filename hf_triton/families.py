"""Tiny random-weight checkpoints of many model families, built offline. Pure tables + builders.

Each :class:`Family` writes a checkpoint in the standard ``save_pretrained`` layout
(``config.json``, ``model.safetensors``, tokenizer or image-processor files) for the
tasks of :mod:`hf_triton.tasks`, with deterministic (seeded) *random* weights:

* the architecture is the family's real one, shrunk (hidden sizes <= 64, two layers or two
  stages), so building, exporting and serving it takes well under a second on a CPU;
* the tokenizer or image processor is the family's real class with the settings its
  reference hub checkpoint (``Family.reference``) uses: a tokenizer of the same kind
  (WordPiece, byte-level BPE, Unigram) whose ~1000-token vocabulary is learnt here from
  :data:`CORPUS` (deterministically) with the family's special tokens in the hub's order;
  an image processor with the hub's resize / crop / normalisation;
* the model config agrees with the tokenizer (``vocab_size``, ``pad/bos/eos_token_id``);
* the same family, task and seed give byte-identical files, in any process.

Nothing is downloaded, and torch / transformers / tokenizers are imported only when a
checkpoint is built. Outputs are meaningless; the checkpoints exist to exercise the
export and serving code on every architecture::

    from hf_triton.families import FAMILIES, make_checkpoint

    make_checkpoint("roberta", "text-classification", Path("/tmp/roberta-cls"))
    for family in FAMILIES.values():
        for task in family.tasks:
            family.make(Path("/tmp/tiny") / family.name / task, task)

Families that transformers cannot build or run offline are listed in :data:`UNAVAILABLE`
with the reason instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

#: Labels of the classification heads (the tasks' ``id2label``).
IMAGE_LABELS: Mapping[int, str] = MappingProxyType({0: "cat", 1: "dog", 2: "bird"})
TEXT_LABELS: Mapping[int, str] = MappingProxyType({0: "NEGATIVE", 1: "POSITIVE"})
#: Token classification (NER): IOB2 tags as CoNLL-2003 checkpoints name them.
NER_LABELS: Mapping[int, str] = MappingProxyType(
    dict(enumerate(("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC")))
)

#: Sizes shared by the text families: hidden 32, 2 layers x 2 heads, FFN 64.
TEXT_HIDDEN = 32
TEXT_LAYERS = 2
TEXT_HEADS = 2
TEXT_FFN = 64
#: The vocabulary size the learnt tokenizers aim at (special tokens included, roughly).
VOCAB_TARGET = 1000
MODEL_MAX_LENGTH = 512

#: The fixed training text of every tokenizer. English plus accented Latin, Greek, Cyrillic,
#: CJK, Arabic, Hindi and emoji, so that normalisation, accents and multi-byte paths are used.
CORPUS: tuple[str, ...] = (
    "I love this movie, it was absolutely wonderful and the actors were great.",
    "This film was terrible: boring, far too long, and the plot made no sense.",
    "The quick brown fox jumps over the lazy dog near the riverbank.",
    "A cat sat on the warm windowsill watching birds in the garden.",
    "Dogs are loyal companions; they bark, play fetch and sleep all afternoon.",
    "The weather today is sunny with a light breeze from the north-west.",
    "Tomorrow it will rain heavily, so remember to take an umbrella!",
    "Machine learning models transform inputs into predictions.",
    "Transformers use attention to relate every token to every other token.",
    "Tokenizers split text into words, subwords and characters.",
    "Serving models on GPUs needs batching, padding and careful memory management.",
    "The inference server returned a response in 12.5 milliseconds.",
    "Please send the report by Friday, 3 March 2025, at 10:30 am.",
    "Numbers like 42, 3.14159, 1,000,000 and -7 appear in text too.",
    "Email support@example.com or visit https://example.org/docs for help.",
    'She said: "It\'s not what you think" - and then she left the room.',
    "What a fantastic experience! I would recommend it to everyone.",
    "Worst purchase ever. The product broke after two days.",
    "The restaurant served delicious pasta, fresh salad and excellent wine.",
    "Our team shipped the new release after weeks of testing and debugging.",
    "Photographs of mountains, lakes and forests filled the small gallery.",
    "He played the piano beautifully while the audience listened quietly.",
    "Students read books, write essays and solve problems every evening.",
    "The city is crowded during the summer festival but calm in winter.",
    "Scientists measured the temperature of the ocean at different depths.",
    "Children laughed as the puppy chased its tail around the kitchen.",
    "The meeting was postponed because the manager was travelling abroad.",
    "Bright colours, loud music and happy people: what a great party!",
    "It was fine, nothing special, an average film with a predictable ending.",
    "Grace Hopper was a computer scientist and a rear admiral of the navy.",
    "Café déjà vu: a naïve résumé from the façade of the Hôtel de Ville.",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein, sagt man.",
    "El niño comió una manzana y la señora bebió café con leche.",
    "Crème brûlée, jalapeño, smörgåsbord, façade, coöperate and Zoë.",
    "São Paulo, Kraków, Reykjavík, Málaga, Zürich and Ærøskøbing.",
    "Ελληνικά: η γρήγορη καφέ αλεπού πηδάει πάνω από τον σκύλο.",
    "Привет, мир! Быстрая коричневая лиса прыгает через ленивую собаку.",
    "日本語のテキストも少し含まれています。東京は大きな都市です。",
    "中文文本：我喜欢这部电影，演员非常好。",
    "한국어 문장도 포함되어 있습니다.",
    "مرحبا بالعالم، هذا نص عربي قصير.",
    "नमस्ते दुनिया, यह एक छोटा हिंदी वाक्य है।",
    "Emoji everywhere 😀 😂 👍 🚀 ❤️ 🐱 🐶 🐦 🎉 and more 🙂.",
    "Symbols: © ® ™ € £ ¥ § ¶ ° ± × ÷ → ← ↑ ↓ ∞ ≠ ≤ ≥.",
    "Quotes “curly” and ‘single’, dashes – and —, ellipsis … and spaces.",
    "Tabs\tand  double  spaces and\nnew lines appear in raw text.",
    "UPPER CASE TEXT, Title Case Text and lower case text.",
    "the and of to in is was for on that with as it at by from this be are",
    "good bad great awful nice poor excellent horrible amazing terrible fine",
    "running jumped swimming played reading writing talked walked thinking",
    "unbelievable internationalization tokenization preprocessing postprocessing",
)

#: Characters every WordPiece / Unigram vocabulary contains, so that ordinary text never
#: falls back to the unknown token (byte-level BPE covers all bytes anyway).
_ALPHABET = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
    "àáâãäåæçèéêëìíîïñòóôõöøùúûüýÿßÀÁÂÄÅÆÇÈÉÊËÎÏÑÓÔÖØÙÚÛÜ"
)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_HALF = (0.5, 0.5, 0.5)
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# PIL resampling filters, numbered as preprocessor_config.json has them.
_NEAREST, _BILINEAR, _BICUBIC = 0, 2, 3


@dataclass(frozen=True)
class Family:
    """A model family: its model classes per task, its preprocessing, and how to build it.

    ``make(path, task)`` writes a tiny checkpoint; ``models[task]`` names the transformers
    class it saves (and the matching Auto class loads), ``preprocessor`` the tokenizer or
    image-processor class, ``preprocessing`` a short description for tables.
    """

    name: str
    modality: str  # "image" or "text"
    models: Mapping[str, str]  # task -> transformers model class name
    # The tokenizer class AutoTokenizer returns, or the image-processor type that
    # preprocessor_config.json names (AutoImageProcessor(..., backend="pil") returns its
    # "...Pil" class, and the torchvision one where torchvision is installed).
    preprocessor: str
    preprocessing: str  # short description: tokenizer kind, or resize / crop / normalisation
    reference: str  # the hub checkpoint whose architecture and preprocessing are mirrored
    _build_preprocessor: Callable[[], Any] = field(repr=False, compare=False)
    _build_config: Callable[[str, Any], Any] = field(repr=False, compare=False)
    #: Re-initialises weights after construction where the default init degenerates.
    _init_weights: Callable[[Any], None] | None = field(default=None, repr=False, compare=False)
    #: Image-text models: the tokenizer, saved with the image processor as one processor.
    _build_tokenizer: Callable[[], Any] | None = field(default=None, repr=False, compare=False)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.models)

    def make(self, path: Path, task: str, seed: int = 0) -> Path:
        """Write a tiny checkpoint with random weights for ``task`` to ``path``; return ``path``.

        ``path`` is created; files of the same names there are overwritten. Deterministic:
        the same ``seed`` gives the same weights (the tokenizer never depends on it).
        """
        if task not in self.models:
            raise ValueError(
                f"Family {self.name!r} has no task {task!r}; it has {', '.join(self.models)}"
            )
        import torch
        import transformers

        preprocessor = self._build_preprocessor()
        if task == "zero-shot-image-classification" and self._build_tokenizer is not None:
            # CLIPModel -> CLIPProcessor, SiglipModel -> SiglipProcessor: both halves, one save.
            prefix = self.models[task][: -len("Model")]
            processor_class = getattr(transformers, prefix + "Processor")
            preprocessor = processor_class(
                image_processor=preprocessor, tokenizer=self._build_tokenizer()
            )
        config = self._build_config(task, preprocessor)
        if task.endswith("-classification") or task == "object-detection":
            labels = IMAGE_LABELS if self.modality == "image" else TEXT_LABELS
            if task == "token-classification":
                labels = NER_LABELS
            config.id2label = dict(labels)
            config.label2id = {label: i for i, label in labels.items()}
        model_class = getattr(transformers, self.models[task])
        torch.manual_seed(seed)
        model = model_class(config).eval()
        if self._init_weights is not None:
            self._init_weights(model)
        if task == "token-classification":
            # Random heads give near-uniform tag scores, where any rounding flips a label;
            # a wider head gives confident, varied tags (entities, B- and I- runs, "O" gaps).
            with torch.no_grad():
                model.classifier.weight.mul_(40.0)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
        preprocessor.save_pretrained(path)
        return path


def make_checkpoint(family: str, task: str, path: Path, seed: int = 0) -> Path:
    """Write the tiny ``family`` checkpoint for ``task`` to ``path`` (see :meth:`Family.make`)."""
    try:
        fam = FAMILIES[family]
    except KeyError:
        reason = UNAVAILABLE.get(family)
        if reason is not None:
            raise ValueError(f"Family {family!r} is unavailable: {reason}") from None
        raise ValueError(f"Unknown family {family!r}; known: {', '.join(FAMILIES)}") from None
    return fam.make(path, task, seed)


# --------------------------------------------------------------------------- tokenizers
#
# The vocabularies are learnt here, in Python, by byte-pair encoding with ties broken by the
# pair's text: the `tokenizers` trainers are not deterministic across processes (WordPiece and
# Unigram pick different pieces on each run: Rust's randomly seeded hash maps decide ties),
# and a checkpoint must not change between the process that builds it and the one that tests it.


@dataclass(frozen=True)
class _Learnt:
    """What byte-pair encoding learnt from :data:`CORPUS` through one tokenizer pipeline."""

    alphabet: tuple[str, ...]  # the single symbols, sorted
    merges: tuple[tuple[str, str], ...]  # in the order learnt
    counts: Mapping[str, int]  # symbol -> occurrences in the corpus' final segmentation


@cache
def _learn(backend_class: str, kind: str) -> _Learnt:
    """Learn ``kind`` ("wordpiece", "bpe", "bpe-eow" or "unigram") pieces through
    ``backend_class``; "bpe-eow" is CLIP's byte-level BPE, whose word ends carry ``</w>``.

    The corpus goes through the normaliser and pre-tokenizer of ``backend_class`` (the
    transformers tokenizer class, built with its placeholder vocabulary), so the pieces fit
    exactly the pipeline that class rebuilds when the checkpoint is loaded back.
    """
    import heapq
    from collections import Counter, defaultdict
    from itertools import pairwise

    import transformers
    from tokenizers import pre_tokenizers

    backend = getattr(transformers, backend_class)().backend_tokenizer
    words: Counter[str] = Counter()
    for line in CORPUS:
        text = backend.normalizer.normalize_str(line) if backend.normalizer else line
        words.update(word for word, _ in backend.pre_tokenizer.pre_tokenize_str(text))

    wordpiece = kind == "wordpiece"
    if kind in ("bpe", "bpe-eow"):
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        if kind == "bpe-eow":  # every byte also as a word's last symbol: no text is unknown
            alphabet |= {c + _EOW for c in alphabet}
    else:
        chars = set(_ALPHABET) | {c for word in words for c in word}
        alphabet = chars | {"##" + c for c in chars} if wordpiece else chars
    seqs = [[w[0], *("##" + c for c in w[1:])] if wordpiece else list(w) for w in words]
    if kind == "bpe-eow":
        seqs = [[*seq[:-1], seq[-1] + _EOW] for seq in seqs]
    weights = list(words.values())

    pairs: Counter[tuple[str, str]] = Counter()
    where: defaultdict[tuple[str, str], set[int]] = defaultdict(set)
    for i, seq in enumerate(seqs):
        for pair in pairwise(seq):
            pairs[pair] += weights[i]
            where[pair].add(i)
    heap = [(-n, pair) for pair, n in pairs.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    budget = VOCAB_TARGET - len(alphabet) - 8  # room for the special tokens
    while heap and len(merges) < budget:
        n, best = heapq.heappop(heap)
        if pairs.get(best, 0) != -n:
            continue  # a stale entry: that pair's count has changed since
        merges.append(best)
        joined = best[0] + (best[1][2:] if wordpiece else best[1])
        changed: set[tuple[str, str]] = set()
        for i in sorted(where.pop(best)):
            seq, out, j = seqs[i], [], 0
            while j < len(seq):
                if j + 1 < len(seq) and (seq[j], seq[j + 1]) == best:
                    out.append(joined)
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            for pair in pairwise(seq):
                pairs[pair] -= weights[i]
                changed.add(pair)
            for pair in pairwise(out):
                pairs[pair] += weights[i]
                where[pair].add(i)
                changed.add(pair)
            seqs[i] = out
        for pair in changed:
            if pairs[pair] > 0:
                heapq.heappush(heap, (-pairs[pair], pair))
            else:
                del pairs[pair]
    counts: Counter[str] = Counter()
    for seq, weight in zip(seqs, weights, strict=True):
        for symbol in seq:
            counts[symbol] += weight
    return _Learnt(tuple(sorted(alphabet)), tuple(merges), MappingProxyType(dict(counts)))


def _pieces(learnt: _Learnt, wordpiece: bool = False) -> list[str]:
    """Alphabet, then every merged piece in the order learnt (no duplicates)."""
    pieces = dict.fromkeys(learnt.alphabet)
    for left, right in learnt.merges:
        pieces[left + (right[2:] if wordpiece else right)] = None
    return list(pieces)


def _vocab_dict(first: tuple[str, ...], pieces: list[str], last: tuple[str, ...] = ()) -> dict:
    """Token -> id: the special tokens ``first``, the pieces, then the tokens ``last``."""
    vocab: dict[str, int] = {}
    for token in (*first, *pieces, *last):
        vocab.setdefault(token, len(vocab))
    return vocab


def _wordpiece(
    tokenizer_class: str, first: tuple[str, ...], last: tuple[str, ...] = ()
) -> Callable[[], Any]:
    """A WordPiece ``tokenizer_class`` (BERT pipeline: lower case, accents stripped)."""

    def build() -> Any:
        import transformers

        pieces = _pieces(_learn("BertTokenizer", "wordpiece"), wordpiece=True)
        cls = getattr(transformers, tokenizer_class)
        return cls(vocab=_vocab_dict(first, pieces, last), model_max_length=MODEL_MAX_LENGTH)

    return build


def _byte_level() -> tuple[list[str], list[tuple[str, str]]]:
    learnt = _learn("RobertaTokenizer", "bpe")
    return _pieces(learnt), list(learnt.merges)


def _roberta_bpe() -> Any:
    """RoBERTa's byte-level BPE: <s>=0 <pad>=1 </s>=2 <unk>=3 ... <mask> last, as roberta-base."""
    from transformers import RobertaTokenizer

    pieces, merges = _byte_level()
    return RobertaTokenizer(
        vocab=_vocab_dict(("<s>", "<pad>", "</s>", "<unk>"), pieces, ("<mask>",)),
        merges=merges,  # type: ignore[arg-type]  # (left, right) pairs, as loading passes them
        model_max_length=MODEL_MAX_LENGTH,
    )


_EOW = "</w>"
#: CLIP's context length (openai/clip-vit-base-patch32's model_max_length).
CLIP_MAX_LENGTH = 77


def _clip_bpe() -> Any:
    """CLIP's tokenizer: byte-level BPE with ``</w>`` word ends, lower case, and
    ``<|startoftext|>``, ``<|endoftext|>`` last (as openai/clip-vit-base-patch32: the text
    tower pools at the first end-of-text token, and the vocabulary's last id is it too)."""
    from transformers import CLIPTokenizer

    learnt = _learn("CLIPTokenizer", "bpe-eow")
    vocab = _vocab_dict((), _pieces(learnt), ("<|startoftext|>", "<|endoftext|>"))
    return CLIPTokenizer(
        vocab=vocab,
        merges=list(learnt.merges),  # type: ignore[arg-type]  # (left, right) pairs
        model_max_length=CLIP_MAX_LENGTH,
    )


#: SigLIP's text length: the zero-shot pipeline pads every text to it.
SIGLIP_MAX_LENGTH = 64


def _siglip_unigram() -> Any:
    """SigLIP's SentencePiece Unigram (``</s>`` pads and ends, ``<unk>``, lower case, byte
    fallback, Metaspace) as a fast tokenizer: ``SiglipTokenizer`` needs the sentencepiece
    package, which this project does not depend on. Only ``input_ids``, as SigLIP's."""
    import math

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab, total = _unigram_vocab(
        _learn("XLMRobertaTokenizer", "unigram"), ("<pad>", "</s>", "<unk>")
    )
    vocab += [(f"<0x{b:02X}>", math.log(1 / total) - 10.0) for b in range(256)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=True))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_input_names=["input_ids"],
        model_max_length=SIGLIP_MAX_LENGTH,
    )


_MODERNBERT_SPECIALS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")
MODERNBERT_MAX_LENGTH = 8192


def _modernbert_bpe() -> Any:
    """ModernBERT's tokenizer: a generic fast tokenizer (tokenizer.json only) around a
    byte-level BPE with ``<|endoftext|>``/``<|padding|>`` first and [UNK] [CLS] [SEP] [PAD]
    [MASK] appended at the end, ``[CLS] $A [SEP]`` templates, as answerdotai/ModernBERT-base."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    pieces, merges = _byte_level()
    vocab = _vocab_dict(("<|endoftext|>", "<|padding|>"), pieces, _MODERNBERT_SPECIALS)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t in ("<|endoftext|>", "<|padding|>")]
        + [
            AddedToken(t, normalized=False, special=True, lstrip=t == "[MASK]")
            for t in _MODERNBERT_SPECIALS
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=MODERNBERT_MAX_LENGTH,
        clean_up_tokenization_spaces=True,
    )


def _unigram_vocab(
    learnt: _Learnt, first: tuple[str, ...], last: tuple[str, ...] = ()
) -> tuple[list[tuple[str, float]], int]:
    """(piece, score) for a Unigram model, and the count the scores are relative to: the
    special tokens ``first`` and ``last`` score 0.0, as SentencePiece gives them; each learnt
    piece the log of its (add-one smoothed) frequency in the corpus' segmentation, so Viterbi
    prefers the learnt pieces."""
    import math

    pieces = [p for p in _pieces(learnt) if p not in first and p not in last]
    total = sum(learnt.counts.values()) + len(pieces)
    vocab = [(token, 0.0) for token in first]
    vocab += [(p, math.log((learnt.counts.get(p, 0) + 1) / total)) for p in pieces]
    vocab += [(token, 0.0) for token in last]
    return vocab, total


def _unigram(
    tokenizer_class: str, first: tuple[str, ...], last: tuple[str, ...] = (), **kwargs: Any
) -> Callable[[], Any]:
    """A SentencePiece-style Unigram ``tokenizer_class`` (Metaspace pipeline) over the pieces
    byte-pair encoding learnt (scores: :func:`_unigram_vocab`)."""

    def build() -> Any:
        import transformers

        vocab, _ = _unigram_vocab(_learn(tokenizer_class, "unigram"), first, last)
        cls = getattr(transformers, tokenizer_class)
        return cls(vocab=vocab, model_max_length=MODEL_MAX_LENGTH, **kwargs)

    return build


# --------------------------------------------------------------------------- image processors


def _processor(class_name: str, **settings: Any) -> Callable[[], Any]:
    """The PIL-backend image processor ``class_name`` with the hub checkpoint's ``settings``.

    The PIL backend needs no torchvision; it saves the canonical ``image_processor_type``
    (e.g. ``ConvNextImageProcessor``), so either backend loads the checkpoint.
    """

    def build() -> Any:
        import transformers

        return getattr(transformers, class_name + "Pil")(**settings)

    return build


# --------------------------------------------------------------------------- model configs


def _text_ids(tok: Any) -> dict[str, Any]:
    """vocab_size and special-token ids of the config, taken from the tokenizer."""
    return {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id}


def _bert_config(_task: str, tok: Any) -> Any:
    from transformers import BertConfig

    return BertConfig(
        hidden_size=TEXT_HIDDEN,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        intermediate_size=TEXT_FFN,
        max_position_embeddings=MODEL_MAX_LENGTH,
        type_vocab_size=2,
        **_text_ids(tok),
    )


def _distilbert_config(_task: str, tok: Any) -> Any:
    from transformers import DistilBertConfig

    return DistilBertConfig(
        dim=TEXT_HIDDEN,
        n_layers=TEXT_LAYERS,
        n_heads=TEXT_HEADS,
        hidden_dim=TEXT_FFN,
        max_position_embeddings=MODEL_MAX_LENGTH,
        **_text_ids(tok),
    )


def _electra_config(_task: str, tok: Any) -> Any:
    from transformers import ElectraConfig

    return ElectraConfig(
        embedding_size=16,  # factorised embeddings, smaller than hidden (as electra-small)
        hidden_size=TEXT_HIDDEN,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        intermediate_size=TEXT_FFN,
        max_position_embeddings=MODEL_MAX_LENGTH,
        **_text_ids(tok),
    )


def _roberta_like(config_class: str) -> Callable[[str, Any], Any]:
    def build(_task: str, tok: Any) -> Any:
        import transformers

        return getattr(transformers, config_class)(
            hidden_size=TEXT_HIDDEN,
            num_hidden_layers=TEXT_LAYERS,
            num_attention_heads=TEXT_HEADS,
            intermediate_size=TEXT_FFN,
            max_position_embeddings=MODEL_MAX_LENGTH + 2,  # positions start after padding_idx
            type_vocab_size=1,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            **_text_ids(tok),
        )

    return build


def _mpnet_config(_task: str, tok: Any) -> Any:
    from transformers import MPNetConfig

    return MPNetConfig(
        hidden_size=TEXT_HIDDEN,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        intermediate_size=TEXT_FFN,
        max_position_embeddings=MODEL_MAX_LENGTH + 2,
        relative_attention_num_buckets=32,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **_text_ids(tok),
    )


def _albert_config(_task: str, tok: Any) -> Any:
    from transformers import AlbertConfig

    return AlbertConfig(
        embedding_size=16,
        hidden_size=TEXT_HIDDEN,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        intermediate_size=TEXT_FFN,
        max_position_embeddings=MODEL_MAX_LENGTH,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        **_text_ids(tok),
    )


#: DeBERTa-v3 config keys that DebertaV2Config does not declare (the model reads them).
_DEBERTA_V3_EXTRA: dict[str, Any] = {
    "position_buckets": 256,
    "norm_rel_ebd": "layer_norm",
    "share_att_key": True,
}


def _deberta_v2_config(_task: str, tok: Any) -> Any:
    """DeBERTa-v3 style: relative attention with log buckets, no absolute positions."""
    from transformers import DebertaV2Config

    return DebertaV2Config(
        hidden_size=TEXT_HIDDEN,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        intermediate_size=TEXT_FFN,
        max_position_embeddings=MODEL_MAX_LENGTH,
        type_vocab_size=0,
        relative_attention=True,
        position_biased_input=False,
        pos_att_type=["p2c", "c2p"],
        max_relative_positions=-1,
        layer_norm_eps=1e-7,
        **_DEBERTA_V3_EXTRA,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        **_text_ids(tok),
    )


def _modernbert_config(_task: str, tok: Any) -> Any:
    from transformers import ModernBertConfig

    return ModernBertConfig(
        vocab_size=-(-len(tok) // 64) * 64,  # padded to a multiple of 64, as the hub's 50368
        hidden_size=TEXT_HIDDEN,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        intermediate_size=TEXT_FFN,
        max_position_embeddings=MODERNBERT_MAX_LENGTH,
        # Layer 0 global, layer 1 sliding-window attention (hub: every 3rd layer global).
        # A window of 16 (hub: 128) makes the sliding mask matter at test lengths.
        layer_types=["full_attention", "sliding_attention"],
        local_attention=16,
        classifier_pooling="mean",
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
        cls_token_id=tok.cls_token_id,
        sep_token_id=tok.sep_token_id,
    )


_VIT_SIZES: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}


def _vision_config(config_class: str, **settings: Any) -> Callable[[str, Any], Any]:
    def build(_task: str, _processor: Any) -> Any:
        import transformers

        return getattr(transformers, config_class)(**settings)

    return build


def _efficientnet_config(_task: str, _processor: Any) -> Any:
    """EfficientNet-B0's layout cut to two MBConv stages, at 1/20 of its width."""
    from transformers import EfficientNetConfig

    config = EfficientNetConfig(
        image_size=224,
        width_coefficient=0.05,
        depth_coefficient=1.0,
        kernel_sizes=[3, 5],
        in_channels=[32, 16],
        out_channels=[16, 24],
        strides=[1, 2],
        num_block_repeats=[1, 1],
        expand_ratios=[1, 6],
        depthwise_padding=[],
        dropout_rate=0.2,
    )
    # The top conv has round_filters(1280) channels; hidden_dim must say the same.
    from transformers.models.efficientnet.modeling_efficientnet import (
        round_filters,
    )

    config.hidden_dim = round_filters(config, 1280)
    return config


def _cnn_weights(model: Any) -> None:
    """Variance-preserving weights for a BatchNorm CNN, and BatchNorm layers that do something.

    transformers initialises EfficientNet's convolutions *and BatchNorm scales* from N(0, 0.02),
    which shrinks activations ~50x per layer (outputs ~1e-22: useless for comparing exports).
    Here convolutions get Kaiming-normal weights, and every BatchNorm random affine parameters
    and running statistics, as a trained network has (so BN folding in exports is exercised).
    Uses the global torch RNG, which :meth:`Family.make` has seeded.
    """
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)


def _rt_detr_config(_task: str, _processor: Any) -> Any:
    """RT-DETR as PekingU/rtdetr_r50vd is built (ResNet-vd backbone, hybrid encoder over three
    feature levels, deformable decoder), at widths of 16-128 and 20 queries."""
    import transformers

    backbone = transformers.RTDetrResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 32, 64, 128],
        depths=[1, 1, 1, 1],
        layer_type="basic",
    )
    backbone.out_features = ["stage2", "stage3", "stage4"]  # the three levels the encoder fuses
    return transformers.RTDetrConfig(
        backbone_config=backbone,
        encoder_hidden_dim=32,
        encoder_in_channels=[32, 64, 128],
        decoder_in_channels=[32, 32, 32],
        feat_strides=[8, 16, 32],
        encoder_layers=1,
        encoder_ffn_dim=64,
        encoder_attention_heads=2,
        d_model=32,
        num_queries=20,
        decoder_layers=2,
        decoder_ffn_dim=64,
        decoder_attention_heads=2,
        decoder_n_points=2,
        num_denoising=0,
    )


def _detector_weights(model: Any) -> None:
    """transformers zero-initialises RT-DETR's encoder score head, so every anchor scores the
    same and the top-k query selection is a tie (broken differently by PyTorch and ONNX
    Runtime); random weights everywhere, BatchNorm as a trained network's (as the CNNs)."""
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.3)
    _cnn_weights(model)


def _clip_config(task: str, processor: Any) -> Any:
    """CLIPVisionConfig for the vision tower; CLIPConfig for CLIPForImageClassification (a
    tiny text tower, unused) and for CLIPModel (zero-shot: a text tower that fits the
    tokenizer, 77 positions, projections to 16, the hub's initial logit scale)."""
    from transformers import CLIPConfig, CLIPVisionConfig

    vision = {**_VIT_SIZES, "image_size": 224, "patch_size": 32, "projection_dim": 32}
    if task == "image-feature-extraction":
        return CLIPVisionConfig(**vision)
    text = {**_VIT_SIZES, "vocab_size": 64, "max_position_embeddings": 16, "projection_dim": 32}
    if task != "zero-shot-image-classification":
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    tok = processor.tokenizer
    text = {
        **_VIT_SIZES,
        "vocab_size": len(tok),
        "max_position_embeddings": CLIP_MAX_LENGTH,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    return CLIPConfig(
        text_config=text,
        vision_config={**vision, "projection_dim": 16},
        projection_dim=16,
        logit_scale_init_value=2.6592,
    )


def _siglip_weights(model: Any) -> None:
    """A logit scale and bias that spread the sigmoid scores (SigLIP's init gives scale 1, bias
    0, where every label scores ~0.5 and a rounding difference reorders them)."""
    import math

    import torch

    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-2.0)


def _siglip_config(_task: str, processor: Any) -> Any:
    """SiglipConfig: tiny towers, a text tower of 64 positions that fits the tokenizer."""
    from transformers import SiglipConfig

    tok = processor.tokenizer
    text = {
        **_VIT_SIZES,
        "vocab_size": len(tok),
        "max_position_embeddings": SIGLIP_MAX_LENGTH,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": None,
        "projection_size": _VIT_SIZES["hidden_size"],
    }
    return SiglipConfig(
        text_config=text, vision_config={**_VIT_SIZES, "image_size": 224, "patch_size": 32}
    )


# --------------------------------------------------------------------------- the tables

_IMAGE = ("image-feature-extraction", "image-classification")
_TEXT = ("text-feature-extraction", "text-classification", "token-classification")


def _image(
    name: str,
    prefix: str,
    processor: str,
    preprocessing: str,
    reference: str,
    build_processor: Callable[[], Any],
    build_config: Callable[[str, Any], Any],
    classifier: str | None = None,
    base: str | None = None,
    tasks: tuple[str, ...] = _IMAGE,
    init_weights: Callable[[Any], None] | None = None,
    zero_shot: tuple[str, Callable[[], Any]] | None = None,
) -> Family:
    """An image family; ``zero_shot``: (image-text model class, its tokenizer builder)."""
    classes = (base or f"{prefix}Model", classifier or f"{prefix}ForImageClassification")
    models = {task: cls for task, cls in zip(_IMAGE, classes, strict=True) if task in tasks}
    if zero_shot is not None:
        models["zero-shot-image-classification"] = zero_shot[0]
    return Family(
        name,
        "image",
        MappingProxyType(models),
        processor,
        preprocessing,
        reference,
        build_processor,
        build_config,
        init_weights,
        zero_shot[1] if zero_shot else None,
    )


def _text(
    name: str,
    prefix: str,
    tokenizer: str,
    preprocessing: str,
    reference: str,
    build_tokenizer: Callable[[], Any],
    build_config: Callable[[str, Any], Any],
) -> Family:
    classes = (
        f"{prefix}Model",
        f"{prefix}ForSequenceClassification",
        f"{prefix}ForTokenClassification",
    )
    models = dict(zip(_TEXT, classes, strict=True))
    return Family(
        name,
        "text",
        MappingProxyType(models),
        tokenizer,
        preprocessing,
        reference,
        build_tokenizer,
        build_config,
    )


_BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_DEIT_PROCESSOR = _processor(
    "DeiTImageProcessor",
    size={"height": 256, "width": 256},
    crop_size={"height": 224, "width": 224},
    do_center_crop=True,
    resample=_BICUBIC,
    image_mean=_IMAGENET_MEAN,
    image_std=_IMAGENET_STD,
)
_DEIT_CONFIG = _vision_config("DeiTConfig", image_size=224, patch_size=32, **_VIT_SIZES)

_FAMILY_LIST: tuple[Family, ...] = (
    # ---- vision
    _image(
        "vit",
        "ViT",
        "ViTImageProcessor",
        "resize 224x224 bilinear, mean/std 0.5",
        "google/vit-base-patch16-224",
        _processor(
            "ViTImageProcessor",
            size={"height": 224, "width": 224},
            resample=_BILINEAR,
            image_mean=_HALF,
            image_std=_HALF,
        ),
        _vision_config("ViTConfig", image_size=224, patch_size=32, **_VIT_SIZES),
    ),
    _image(
        "deit",
        "DeiT",
        "DeiTImageProcessor",
        "resize 256x256 bicubic + center crop 224, ImageNet mean/std",
        "facebook/deit-base-distilled-patch16-224",
        _DEIT_PROCESSOR,
        _DEIT_CONFIG,
    ),
    # What the distilled hub checkpoints really are (the plain deit-* checkpoints are ViT):
    # three logits outputs (logits = mean of cls_logits and distillation_logits), and an
    # architecture name that does not end in "ForImageClassification".
    _image(
        "deit-distilled",
        "DeiT",
        "DeiTImageProcessor",
        "resize 256x256 bicubic + center crop 224, ImageNet mean/std",
        "facebook/deit-base-distilled-patch16-224",
        _DEIT_PROCESSOR,
        _DEIT_CONFIG,
        classifier="DeiTForImageClassificationWithTeacher",
        tasks=("image-classification",),
    ),
    _image(
        "beit",
        "Beit",
        "BeitImageProcessor",
        "resize 224x224 bilinear, no crop, mean/std 0.5",
        "microsoft/beit-base-patch16-224",
        _processor(
            "BeitImageProcessor",
            size={"height": 224, "width": 224},
            crop_size={"height": 224, "width": 224},
            do_center_crop=False,
            resample=_BILINEAR,
            image_mean=_HALF,
            image_std=_HALF,
        ),
        _vision_config(
            "BeitConfig",
            image_size=224,
            patch_size=32,
            use_relative_position_bias=True,
            use_absolute_position_embeddings=False,
            use_mean_pooling=True,
            layer_scale_init_value=0.1,
            **_VIT_SIZES,
        ),
    ),
    _image(
        "swin",
        "Swin",
        "ViTImageProcessor",
        "resize 224x224 bicubic, ImageNet mean/std",
        "microsoft/swin-tiny-patch4-window7-224",
        _processor(
            "ViTImageProcessor",
            size={"height": 224, "width": 224},
            resample=_BICUBIC,
            image_mean=_IMAGENET_MEAN,
            image_std=_IMAGENET_STD,
        ),
        # Two stages of two blocks: the second block of a stage is the shifted-window one.
        _vision_config(
            "SwinConfig",
            image_size=224,
            patch_size=4,
            embed_dim=16,
            depths=[2, 2],
            num_heads=[1, 2],
            window_size=7,
            mlp_ratio=2.0,
        ),
    ),
    _image(
        "convnext",
        "ConvNext",
        "ConvNextImageProcessor",
        "shortest edge 256 (224/crop_pct 0.875) bicubic + center crop 224, ImageNet mean/std",
        "facebook/convnext-tiny-224",
        _processor(
            "ConvNextImageProcessor",
            size={"shortest_edge": 224},
            crop_pct=0.875,
            resample=_BICUBIC,
            image_mean=_IMAGENET_MEAN,
            image_std=_IMAGENET_STD,
        ),
        _vision_config(
            "ConvNextConfig",
            image_size=224,
            patch_size=4,
            num_stages=2,
            hidden_sizes=[16, 32],
            depths=[1, 1],
        ),
    ),
    _image(
        "resnet",
        "ResNet",
        "ConvNextImageProcessor",
        "shortest edge 256 (224/crop_pct 0.875) bicubic + center crop 224, ImageNet mean/std",
        "microsoft/resnet-50",
        _processor(
            "ConvNextImageProcessor",
            size={"shortest_edge": 224},
            crop_pct=0.875,
            resample=_BICUBIC,
            image_mean=_IMAGENET_MEAN,
            image_std=_IMAGENET_STD,
        ),
        _vision_config(
            "ResNetConfig",
            embedding_size=16,
            hidden_sizes=[32, 64],
            depths=[1, 1],
            layer_type="bottleneck",
            hidden_act="relu",
            downsample_in_first_stage=False,
        ),
        init_weights=_cnn_weights,
    ),
    _image(
        "dinov2",
        "Dinov2",
        "BitImageProcessor",
        "shortest edge 256 bicubic + center crop 224, ImageNet mean/std, convert RGB",
        "facebook/dinov2-small",
        _processor(
            "BitImageProcessor",
            size={"shortest_edge": 256},
            crop_size={"height": 224, "width": 224},
            do_center_crop=True,
            do_convert_rgb=True,
            resample=_BICUBIC,
            image_mean=_IMAGENET_MEAN,
            image_std=_IMAGENET_STD,
        ),
        # As the hub: position embeddings for 518 px, interpolated to the 224 px crop.
        _vision_config(
            "Dinov2Config",
            image_size=518,
            patch_size=14,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_ratio=2,
            layerscale_value=1.0,
        ),
    ),
    _image(
        "efficientnet",
        "EfficientNet",
        "EfficientNetImageProcessor",
        "resize 224x224 nearest, ImageNet mean, include_top (second division by std)",
        "google/efficientnet-b0",
        _processor(
            "EfficientNetImageProcessor",
            size={"height": 224, "width": 224},
            crop_size={"height": 289, "width": 289},
            do_center_crop=False,
            resample=_NEAREST,
            rescale_offset=False,
            include_top=True,
            image_mean=_IMAGENET_MEAN,
            image_std=(0.47853944, 0.4732864, 0.47434163),
        ),
        _efficientnet_config,
        init_weights=_cnn_weights,
    ),
    _image(
        "clip",
        "CLIP",
        "CLIPImageProcessor",
        "shortest edge 224 bicubic + center crop 224, OpenAI CLIP mean/std, convert RGB",
        "openai/clip-vit-base-patch32",
        _processor(
            "CLIPImageProcessor",
            size={"shortest_edge": 224},
            crop_size={"height": 224, "width": 224},
            do_center_crop=True,
            do_convert_rgb=True,
            resample=_BICUBIC,
            image_mean=_CLIP_MEAN,
            image_std=_CLIP_STD,
        ),
        _clip_config,
        base="CLIPVisionModel",
        zero_shot=("CLIPModel", _clip_bpe),
    ),
    Family(
        "siglip",
        "image",
        MappingProxyType({"zero-shot-image-classification": "SiglipModel"}),
        "SiglipImageProcessor",
        "resize 224x224 bicubic, mean/std 0.5; Unigram text padded to 64, sigmoid scores",
        "google/siglip-base-patch16-224",
        _processor(
            "SiglipImageProcessor",
            size={"height": 224, "width": 224},
            resample=_BICUBIC,
            image_mean=_HALF,
            image_std=_HALF,
        ),
        _siglip_config,
        _siglip_weights,
        _build_tokenizer=_siglip_unigram,
    ),
    Family(
        "rt-detr",
        "image",
        MappingProxyType({"object-detection": "RTDetrForObjectDetection"}),
        "RTDetrImageProcessor",
        "resize 640x640 bilinear, rescale 1/255, no normalisation",
        "PekingU/rtdetr_r50vd",
        _processor("RTDetrImageProcessor", size={"height": 640, "width": 640}),
        _rt_detr_config,
        _detector_weights,
    ),
    # ---- text
    _text(
        "bert",
        "Bert",
        "BertTokenizer",
        "WordPiece, lower case",
        "google-bert/bert-base-uncased",
        _wordpiece("BertTokenizer", _BERT_SPECIALS),
        _bert_config,
    ),
    _text(
        "distilbert",
        "DistilBert",
        "DistilBertTokenizer",
        "WordPiece, lower case, no token_type_ids",
        "distilbert/distilbert-base-uncased",
        _wordpiece("DistilBertTokenizer", _BERT_SPECIALS),
        _distilbert_config,
    ),
    _text(
        "roberta",
        "Roberta",
        "RobertaTokenizer",
        "byte-level BPE",
        "FacebookAI/roberta-base",
        _roberta_bpe,
        _roberta_like("RobertaConfig"),
    ),
    _text(
        "xlm-roberta",
        "XLMRoberta",
        "XLMRobertaTokenizer",
        "Unigram (SentencePiece)",
        "FacebookAI/xlm-roberta-base",
        _unigram("XLMRobertaTokenizer", ("<s>", "<pad>", "</s>", "<unk>"), ("<mask>",)),
        _roberta_like("XLMRobertaConfig"),
    ),
    _text(
        "mpnet",
        "MPNet",
        "MPNetTokenizer",
        "WordPiece, lower case, <s> </s> specials",
        "microsoft/mpnet-base",
        _wordpiece("MPNetTokenizer", ("<s>", "<pad>", "</s>", "<unk>", "[UNK]"), ("<mask>",)),
        _mpnet_config,
    ),
    _text(
        "albert",
        "Albert",
        "AlbertTokenizer",
        "Unigram (SentencePiece), lower case, accents stripped",
        "albert/albert-base-v2",
        _unigram("AlbertTokenizer", ("<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]")),
        _albert_config,
    ),
    _text(
        "deberta-v2",
        "DebertaV2",
        "DebertaV2Tokenizer",
        "Unigram (SentencePiece), cased",
        "microsoft/deberta-v3-base",
        _unigram("DebertaV2Tokenizer", ("[PAD]", "[CLS]", "[SEP]", "[UNK]"), ("[MASK]",)),
        _deberta_v2_config,
    ),
    _text(
        "electra",
        "Electra",
        "BertTokenizer",  # what AutoTokenizer gives (ElectraTokenizer is an alias in v5)
        "WordPiece, lower case",
        "google/electra-small-discriminator",
        _wordpiece("ElectraTokenizer", _BERT_SPECIALS),
        _electra_config,
    ),
    _text(
        "modernbert",
        "ModernBert",
        "TokenizersBackend",
        "byte-level BPE (generic tokenizer.json)",
        "answerdotai/ModernBERT-base",
        _modernbert_bpe,
        _modernbert_config,
    ),
)

#: Family name -> family, in table order (vision first).
FAMILIES: Mapping[str, Family] = MappingProxyType({f.name: f for f in _FAMILY_LIST})

#: Families that transformers cannot build or run offline: name -> reason (with the error).
UNAVAILABLE: Mapping[str, str] = MappingProxyType({})


def families_for(task: str) -> tuple[Family, ...]:
    """The families that can build a checkpoint for ``task``."""
    return tuple(f for f in FAMILIES.values() if task in f.models)
