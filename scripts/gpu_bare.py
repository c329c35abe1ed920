"""Bare PyTorch on the GPU: ViT-base/16 and all-MiniLM-L6-v2's architecture, fp32 and fp16.

Part of scripts/gpu_check.sh. Throughput (items/s) at each batch size, CUDA-synchronised,
the median of three timed runs after a warm-up; inputs already on the GPU (what a served
model adds on top -- decoding, copies, batching -- is what the served benchmark measures).
Weights are random (no hub on that machine): the default ViT's offline stand-in, and a
BertModel with all-MiniLM-L6-v2's configuration; the speed is the architecture's.

    python scripts/gpu_bare.py [--batches 1,8,32,64] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: all-MiniLM-L6-v2's config.json (the architecture; its weights are not needed for speed).
MINILM = dict(
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
    vocab_size=30522,
    max_position_embeddings=512,
)
SEQ_LEN = 32  # tokens per sentence: a typical sentence and its special tokens fit


def models(workdir: Path) -> dict[str, tuple[torch.nn.Module, object]]:
    from transformers import BertConfig, BertModel, ViTModel

    from hf_triton.checkpoints import DEFAULT_CHECKPOINT, build_standin

    vit = ViTModel.from_pretrained(build_standin(DEFAULT_CHECKPOINT, workdir).path)
    minilm = BertModel(BertConfig(**MINILM))

    def vit_input(batch: int, device: torch.device, dtype: torch.dtype) -> dict:
        return {"pixel_values": torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)}

    def text_input(batch: int, device: torch.device, dtype: torch.dtype) -> dict:
        ids = torch.randint(1000, 30000, (batch, SEQ_LEN), device=device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    return {"vit-base-patch16-224": (vit, vit_input), "all-MiniLM-L6-v2": (minilm, text_input)}


def throughput(model, make_input, batch: int, device, dtype, seconds: float = 1.0) -> float:
    feed = make_input(batch, device, dtype)
    with torch.inference_mode():
        for _ in range(3):
            model(**feed)
        torch.cuda.synchronize(device)
        rates = []
        for _ in range(3):
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / 3:
                model(**feed)
                n += 1
            torch.cuda.synchronize(device)
            rates.append(n * batch / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--out", type=Path, default=Path("gpu-out/bare.json"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hf_triton_gpu_bare"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0)
    name = torch.cuda.get_device_name(device)
    print(f"GPU: {name}; torch {torch.__version__}; sequence length {SEQ_LEN} for text")
    results = []
    for label, (model, make_input) in models(args.workdir).items():
        for dtype in (torch.float32, torch.float16):
            m = model.to(device=device, dtype=dtype).eval()
            for batch in (int(b) for b in args.batches.split(",")):
                rate = throughput(m, make_input, batch, device, dtype)
                prec = "fp16" if dtype == torch.float16 else "fp32"
                print(f"  {label:<22} {prec} batch {batch:>3}: {rate:10.1f} items/s", flush=True)
                results.append(
                    {"model": label, "precision": prec, "batch": batch, "items_per_s": rate}
                )
        model.to("cpu")
        torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"gpu": name, "seq_len": SEQ_LEN, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
