"""Images/s end to end (JPEG decode, resize, crop, normalise, model) on this CPU:
every embedkit runtime/precision candidate (ONNX Runtime, torch, OpenVINO fp32; OpenVINO bf16
and torch bf16 autocast where the CPU has bf16; PIL + numpy preprocessing in decoding threads sized
to the machine, overlapped with the model) vs torch eager on the same files and the same
preprocessing, run side by side, interleaved. Prints the CPU model and matrix-engine flags, the
cosine of each candidate to fp32, where the time goes (decode, resize, model), whether Pillow's
reduced-size JPEG decoding keeps the preprocessing parity gate, and what ``embedkit tune`` picks
on these photos. With no prior record (the artifact copied into a fresh model store), it
prints what ``runtime="auto"`` picks on first use, the one-off cost of that measurement, and
that choice's end-to-end ratio to torch eager fp32, interleaved with the rest.

Every run ends: the DataLoader's worker processes are awaited at most ``--worker-timeout``
seconds per batch (then the variant says "not run: why"), and an embedkit candidate whose first
pass is more than ``--far`` times slower than the fastest is time-boxed to that one pass (not the
torch anchors, ONNX Runtime fp32 or auto's choice: the ratios are taken against them).

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

from embedkit.encoders.tuning import tune_table
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


def torch_loader(module, paths, preprocess, batch, torch, workers, timeout=300.0):
    # timeout: a worker that never delivers a batch raises (RuntimeError) instead of a wait for ever.
    loader = torch.utils.data.DataLoader(Files(paths, preprocess), batch_size=batch, num_workers=workers,
                                         timeout=timeout if workers else 0)
    out = []
    with torch.inference_mode():
        for x in loader:
            out.append(module(x).numpy())
    return np.concatenate(out)


def where_time_goes(encoder, paths, batch):
    """Seconds per image for decode (read + JPEG decode + EXIF), resize (resample, crop, normalise)
    and the model (the encoder's runtime on stacked batches), each measured alone on one thread."""
    from embedkit.inputs.image import stack

    processor = encoder.processor
    t = time.perf_counter()
    images = [processor.open(p) for p in paths]
    decode = time.perf_counter() - t
    t = time.perf_counter()
    rows = []
    for image in images:
        bands = processor.channels(image)
        out = np.stack([processor._resize(b) for b in bands] * (3 if len(bands) == 1 else 1))
        rows.append(out * processor._scale[:, None, None] + processor._offset[:, None, None])
    resize = time.perf_counter() - t
    batches = [stack(rows[i:i + batch]) for i in range(0, len(rows), batch)]
    encoder.runtime.run(batches[0])
    t = time.perf_counter()
    for b in batches:
        encoder.runtime.run(b)
    model = time.perf_counter() - t
    n = len(paths)
    return {"decode": decode / n, "resize": resize / n, "model": model / n}


def draft_parity(processor, paths, torch_preprocess_fn, preprocess):
    """Pillow's reduced-size JPEG decoding (``Image.draft``: DCT scaling by 1/2, 1/4, 1/8 to at least
    the resize target), then the same resize: max |diff| to the reference transform, and its speed-up
    of decoding. The preprocessing parity gate of the vision plugin is max |diff| <= 1e-3."""
    from PIL import Image

    worst, plain_t, draft_t, reduced = 0.0, 0.0, 0.0, 0
    for p in paths:
        ref = torch_preprocess_fn(p, preprocess).numpy()
        t = time.perf_counter()
        Image.open(p).convert("RGB")
        plain_t += time.perf_counter() - t
        t = time.perf_counter()
        image = Image.open(p)
        w, h = image.size
        scale = preprocess.resize / min(w, h)
        image.draft("RGB", (max(1, int(w * scale)), max(1, int(h * scale))))
        reduced += image.size != (w, h)  # DCT scaling only applies when the target is <= half the size
        image = image.convert("RGB")
        draft_t += time.perf_counter() - t
        out = processor(image)[0]
        if out.shape == ref.shape:
            worst = max(worst, float(np.abs(out - ref).max()))
        else:
            worst = float("inf")
    return worst, plain_t / max(draft_t, 1e-9), reduced


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="mobilenet-v2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--limit", type=int, default=0, help="use only the first N files")
    parser.add_argument("--worker-timeout", type=float, default=300.0, help="seconds per DataLoader batch at most")
    parser.add_argument("--far", type=float, default=4.0,
                        help="a path whose first pass is this much slower than the fastest is timed once only")
    parser.add_argument("--tune", action="store_true", help="also run the thorough embedkit.tune on 64 photos")
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"{DATA} is not present", file=sys.stderr)
        return 1
    import shutil
    import tempfile

    import torch

    import embedkit
    from embedkit.encoder import encoder_for
    from embedkit.encoders.tuning import FIRST_USE_BUDGET, machine
    from embedkit.models.probes import cosine
    from embedkit.runtimes.candidates import candidates_for
    from embedkit.runtimes.cpu import cpu_count, describe
    from embedkit.runtimes.records import recorded

    folder = embedkit.image_folder(DATA)
    paths = [p for p in folder.paths if p.lower().endswith((".jpg", ".jpeg"))]
    paths = paths[: args.limit] if args.limit else paths
    backbone = embedkit.get_backbone(args.backbone)
    artifact = embedkit.export(backbone)
    cpu = describe()
    ov = machine("cpu").get("openvino")
    print(f"CPU: {cpu['model']}, {cpu_count()} cores usable (cgroup quota: "
          f"{'%g CPUs' % cpu['quota'] if cpu['quota'] else 'none'}); matrix-engine flags present: "
          f"{', '.join(cpu['matrix_flags']) or 'none'}; absent: {', '.join(cpu['absent']) or 'none'}; "
          f"bf16 in hardware: {'yes' if cpu['bf16'] else 'no'}")
    print("OpenVINO: " + (f"{ov['version'].split('-')[0]}, capabilities {ov['capabilities']}, default precision "
                          f"{ov['default_precision']}" if ov else "not installed"))
    # First use as a new user meets it: the artifact in a fresh store (no record), default settings.
    fresh_store = Path(tempfile.mkdtemp(prefix="embedkit-images-cpu-"))
    fresh = embedkit.Artifact.open(shutil.copytree(artifact.path, fresh_store / artifact.name / artifact.digest))
    started = time.perf_counter()
    auto = encoder_for(fresh, tune=True, batch_size=args.batch)
    first_use_s = time.perf_counter() - started
    first = recorded(fresh, "cpu")
    auto_name = f"embedkit auto (chose {first['choice'] if first else 'onnxruntime'})"
    encoders = {auto_name: auto}
    not_run: dict[str, str] = {}
    for name in candidates_for("cpu", artifact):
        try:
            encoders[f"embedkit {name}"] = encoder_for(artifact, runtime=name, batch_size=args.batch)
        except Exception as exc:  # noqa: BLE001 - say why a candidate is absent here
            not_run[f"embedkit {name}"] = f"cannot run here: {type(exc).__name__}: {exc}"
    encoder = encoders["embedkit onnxruntime"]
    module = backbone.build().eval()
    torch.set_num_threads(cpu_count())
    workers = cpu_count()
    megapixels = sum(__import__("PIL.Image").Image.open(p).size[0] * __import__("PIL.Image").Image.open(p).size[1]
                     for p in paths) / 1e6
    print(f"{len(paths)} JPEGs ({megapixels:.0f} MP in all), {args.backbone}, batch {args.batch}, "
          f"{cpu_count()} cores, {encoder.workers} decode threads, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads. The machine is shared: ratios within one run are fairer "
          "than absolute rates.")
    timings: dict[str, list[float]] = {k: [] for k in encoders}
    timings.update({"torch loop": [], "torch DataLoader": [], "torch PIL-resize loop": []})
    results = {}
    boxed: set[str] = set()
    for r in range(args.rounds):
        for name in list(timings):
            if name in boxed:
                continue
            start = time.perf_counter()
            try:
                if name in encoders:
                    res = encoders[name].encode(paths)
                    assert res.stats.failed == 0, res.errors
                    results[name] = res.vectors
                elif name == "torch loop":
                    results[name] = torch_loop(module, paths, backbone.preprocess, args.batch, torch)
                elif name == "torch PIL-resize loop":
                    results[name] = torch_pil_loop(module, paths, backbone.preprocess, args.batch, torch)
                else:
                    results[name] = torch_loader(module, paths, backbone.preprocess, args.batch, torch, workers,
                                                 args.worker_timeout)
            except RuntimeError as exc:  # the DataLoader's timeout, a worker that died
                not_run[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
                timings.pop(name)
                results.pop(name, None)
                continue
            timings[name].append(time.perf_counter() - start)
        if r == 0:  # time-box the far slower: their first pass is their one measurement
            fastest = min(v[0] for v in timings.values())
            # Only embedkit's other candidates: the torch anchors, ONNX Runtime fp32 and auto's choice
            # are what the ratios are taken against.
            boxed = {k for k, v in timings.items() if v[0] > args.far * fastest and k.startswith("embedkit ")
                     and k not in (auto_name, "embedkit onnxruntime")}
    rates = {k: len(paths) / min(v) for k, v in timings.items()}
    anchor = max(v for k, v in rates.items() if k.startswith("torch"))
    fp32 = results["embedkit onnxruntime"]
    for name, rate in rates.items():
        cos = cosine(results[name], fp32)
        print(f"{name:<26} {rate:7.1f} images/s   best of {args.rounds}   {rate / anchor:5.2f}x torch eager   "
              f"{rates['torch loop'] and rate / rates['torch loop']:5.2f}x torch loop   "
              f"cos to fp32 mean {cos.mean():.6f} min {cos.min():.6f}"
              + ("   time-boxed: 1 pass" if name in boxed else ""))
    for name, why in not_run.items():
        print(f"{name:<26} not run: {why}")
    print(f"min cosine embedkit vs torch (same float preprocessing): "
          f"{cosine(fp32, results['torch loop']).min():.6f}; "
          f"vs the PIL-uint8 variant: {cosine(fp32, results['torch PIL-resize loop']).min():.6f}")
    # Where the time goes, one thread each: decode, resize, model (per candidate runtime).
    share = where_time_goes(encoder, paths[:64], args.batch)
    print(f"where the time goes (one thread, per image): decode {1e3 * share['decode']:.1f} ms, "
          f"resize+normalise {1e3 * share['resize']:.1f} ms, model (onnxruntime) {1e3 * share['model']:.1f} ms")
    for name, enc in encoders.items():
        if name != "embedkit onnxruntime":
            m = where_time_goes(enc, paths[:32], args.batch)["model"]
            print(f"  model ({name[len('embedkit '):]}) {1e3 * m:.1f} ms/image")
    worst, speed, reduced = draft_parity(encoder.processor, paths[:24], torch_preprocess, backbone.preprocess)
    print(f"reduced-size JPEG decoding (Image.draft): {reduced} of 24 photos decoded at reduced size, decode "
          f"{speed:.2f}x as fast, max |diff| to the reference "
          f"transform {worst:.3g} (gate 1e-3): {'usable' if worst <= 1e-3 else 'REFUSED: pixels differ, not used'}")
    if first is not None:
        print(f"first use (no prior record, default settings): measured in {first_use_s:.1f}s, a one-off cost "
              f"(budget {FIRST_USE_BUDGET:g}s), chose {first['choice']} ({first['precision']}):")
        print("\n".join(tune_table(first)))
    else:
        print(f"first use: the measurement failed after {first_use_s:.1f}s (see the log); auto runs ONNX Runtime")
    if args.tune:
        tuned = embedkit.tune(artifact, items=paths[:64], seconds=1.0, batch_size=args.batch)
        print(f"thorough embedkit tune on 64 of these photos chose {tuned['choice']} ({tuned['precision']}):")
        print("\n".join(tune_table(tuned)))
    best = rates[auto_name]
    print(f"embedkit with default settings (auto, first use included above) end to end: "
          f"{best / rates['torch loop']:.2f}x torch eager fp32 loop, {best / anchor:.2f}x the fastest torch variant")
    shutil.rmtree(fresh_store, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
