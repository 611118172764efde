"""Images/s end to end (JPEG decode, resize, crop, normalise, model) on this CPU:
embedkit (PIL + numpy preprocessing in decoding threads overlapped with ONNX Runtime) vs
torch eager on the same files and the same preprocessing, run side by side, interleaved.

The torch side is the usual eager loop: PIL decode, the torch-side transform
(``interpolate(antialias=True)``, crop, normalise), batches of ``--batch`` through the module in
``inference_mode`` with torch's intra-op threads on every core. Two more torch variants run: a
``DataLoader`` with worker processes, and the classic torchvision-style transform (PIL's uint8
resize and crop, then ``to_tensor`` + normalise; written out, as torchvision does not import
beside the CPU torch wheel). The fastest torch variant is the anchor. Model-only rates
(torch eager vs ONNX Runtime on the same preprocessed batch) are printed too.

    python benchmarks/images_cpu.py [--backbone mobilenet-v2] [--rounds 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from embedkit.testing import torch_preprocess

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "images" / "hymenoptera"


class Files:
    """A map-style dataset over the files, for the DataLoader variant."""

    def __init__(self, paths, preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return torch_preprocess(self.paths[i], self.preprocess)


def pil_transform(path: str, preprocess, torch):
    """torchvision's classic eval transform on PIL images: Resize + CenterCrop in uint8, then normalise."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    w, h = image.size
    size = preprocess.resize
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[preprocess.interpolation]
    image = image.resize((nw, nh), resample)
    ch, cw = preprocess.crop
    top, left = int(round((nh - ch) / 2.0)), int(round((nw - cw) / 2.0))
    image = image.crop((left, top, left + cw, top + ch))
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(preprocess.mean)[:, None, None]) / torch.tensor(preprocess.std)[:, None, None]


def torch_pil_loop(module, paths, preprocess, batch, torch):
    out = []
    with torch.inference_mode():
        for start in range(0, len(paths), batch):
            x = torch.stack([pil_transform(p, preprocess, torch) for p in paths[start:start + batch]])
            out.append(module(x).numpy())
    return np.concatenate(out)


def torch_loop(module, paths, preprocess, batch, torch):
    out = []
    with torch.inference_mode():
        for start in range(0, len(paths), batch):
            x = torch.stack([torch_preprocess(p, preprocess) for p in paths[start:start + batch]])
            out.append(module(x).numpy())
    return np.concatenate(out)


def torch_loader(module, paths, preprocess, batch, torch, workers):
    loader = torch.utils.data.DataLoader(Files(paths, preprocess), batch_size=batch, num_workers=workers)
    out = []
    with torch.inference_mode():
        for x in loader:
            out.append(module(x).numpy())
    return np.concatenate(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="mobilenet-v2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--limit", type=int, default=0, help="use only the first N files")
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"{DATA} is not present", file=sys.stderr)
        return 1
    import torch

    import embedkit
    from embedkit.probes import cosine
    from embedkit.runtime import cpu_count

    folder = embedkit.image_folder(DATA)
    paths = [p for p in folder.paths if p.lower().endswith((".jpg", ".jpeg"))]
    paths = paths[: args.limit] if args.limit else paths
    backbone = embedkit.get_backbone(args.backbone)
    artifact = embedkit.export(backbone)
    encoder = embedkit.ImageEncoder(artifact, batch_size=args.batch)
    module = backbone.build().eval()
    torch.set_num_threads(cpu_count())
    workers = cpu_count()
    megapixels = sum(__import__("PIL.Image").Image.open(p).size[0] * __import__("PIL.Image").Image.open(p).size[1]
                     for p in paths) / 1e6
    print(f"{len(paths)} JPEGs ({megapixels:.0f} MP in all), {args.backbone}, batch {args.batch}, "
          f"{cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} torch threads")
    timings: dict[str, list[float]] = {"embedkit": [], "torch loop": [], "torch DataLoader": [], "torch PIL-resize loop": []}
    results = {}
    for r in range(args.rounds):
        for name in timings:
            start = time.perf_counter()
            if name == "embedkit":
                res = encoder.encode(paths)
                assert res.stats.failed == 0, res.errors
                results[name] = res.vectors
            elif name == "torch loop":
                results[name] = torch_loop(module, paths, backbone.preprocess, args.batch, torch)
            elif name == "torch PIL-resize loop":
                results[name] = torch_pil_loop(module, paths, backbone.preprocess, args.batch, torch)
            else:
                results[name] = torch_loader(module, paths, backbone.preprocess, args.batch, torch, workers)
            timings[name].append(time.perf_counter() - start)
    rates = {k: len(paths) / min(v) for k, v in timings.items()}
    anchor = max(v for k, v in rates.items() if k != "embedkit")
    for name, rate in rates.items():
        print(f"{name:<22} {rate:7.1f} images/s   best of {args.rounds}   ratio {rate / anchor:.2f}x")
    print(f"embedkit vs the faster torch eager variant: {rates['embedkit'] / anchor:.2f}x (target >= 3x)")
    print(f"min cosine embedkit vs torch (same float preprocessing): "
          f"{cosine(results['embedkit'], results['torch loop']).min():.6f}; "
          f"vs the PIL-uint8 variant: {cosine(results['embedkit'], results['torch PIL-resize loop']).min():.6f}")
    # Model only, on one preprocessed batch: where the end-to-end difference comes from.
    x = np.stack([encoder.processor(p)[0] for p in paths[: args.batch]])
    model_rates = {}
    for name, run in (("torch eager", lambda: module(torch.from_numpy(x))), ("onnxruntime", lambda: encoder.runtime.run({"pixel_values": x}))):
        with torch.inference_mode():
            run()
            start = time.perf_counter()
            for _ in range(5):
                run()
        model_rates[name] = 5 * len(x) / (time.perf_counter() - start)
    print(f"model only, batch {len(x)}: torch eager {model_rates['torch eager']:.1f} images/s, "
          f"onnxruntime (one session) {model_rates['onnxruntime']:.1f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
