"""Peak RSS of `embedkit.extract` over 20,000 and 200,000 short texts (target: within 100 MB).

Each size runs in its own process, which reports its own peak RSS (ru_maxrss). Texts are
SST-2 phrases from ../shared/data, numbered to make 200,000 distinct ones.

    python benchmarks/extract_memory.py [--sizes 20000 200000]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "text" / "sst2" / "glue_train.tsv"

CHILD = """
import resource, sys, time, embedkit
start = time.perf_counter()
report = embedkit.extract(sys.argv[1], "minilm-l6", sys.argv[2])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{report.total} {report.ok} {report.failed} {peak:.1f} {time.perf_counter() - start:.1f}")
"""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 200000])
    args = parser.parse_args()
    phrases = [line.split("\t")[0].strip() for line in SST2.read_text(encoding="utf-8").splitlines()[1:]]
    phrases = [p for p in phrases if p]
    work = Path(tempfile.mkdtemp(prefix="embedkit-mem-"))
    import embedkit

    embedkit.export("minilm-l6")  # exported once, outside the measured processes
    peaks = {}
    for n in args.sizes:
        source = work / f"{n}.txt"
        with open(source, "w", encoding="utf-8") as f:
            for i in range(n):
                f.write(f"{phrases[i % len(phrases)]} {i // len(phrases)}\n")
        out = subprocess.run([sys.executable, "-c", CHILD, str(source), str(work / f"store-{n}")],
                             capture_output=True, text=True, check=True)
        total, ok, failed, peak, seconds = out.stdout.split()
        peaks[n] = float(peak)
        print(f"{int(total):>7} texts: {ok} ok, {failed} failed, peak RSS {float(peak):.0f} MB, {float(seconds):.0f} s")
    small, large = min(peaks), max(peaks)
    diff = peaks[large] - peaks[small]
    print(f"peak RSS difference {large} vs {small}: {diff:+.0f} MB (target <= 100 MB): {'met' if diff <= 100 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
