#!/usr/bin/env bash
# One visit to the GPU machine (see ../shared/DEVICE.md): run from the repository root there,
# after the onnxruntime-gpu wheel pieces were carried to /tmp/ort (DEVICE.md) and the MiniLM
# skeleton to .bench/minilm (here: python benchmarks/gpu.py --write-skeleton .bench/minilm).
#   bash benchmarks/gpu_visit.sh [extra gpu.py arguments]
set -euo pipefail
if [ ! -f /tmp/ort/onnxruntime_gpu.whl ]; then
    cat /tmp/ort/p0* > /tmp/ort/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
    ln -sf /tmp/ort/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl /tmp/ort/onnxruntime_gpu.whl
fi
python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/ort/onnxruntime_gpu-1.31.1-*.whl
# embedkit and its plugins, installed (not on PYTHONPATH) so their entry points exist
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . plugins/embedkit-text plugins/embedkit-vision
export PYTHONPATH=/tmp/site
python3 -c "import onnxruntime as o; o.preload_dlls(); print(o.__version__, o.get_available_providers())"
mkdir -p "${OUT:-/tmp/out}"
python3 benchmarks/gpu.py --skeleton .bench/minilm "$@" 2>&1 | tee "${OUT:-/tmp/out}/gpu.txt"
