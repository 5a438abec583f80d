#!/usr/bin/env bash
# The GPU check of the monitors issue, for a session that is lent a device (device tool):
# the single-device monitor tests on CUDA in float32, 16-mixed and bf16-mixed, then the
# overhead benchmark on the GPU. Sized for well under 8 minutes on one H100.
# Usage, from the repository root, in an environment with a CUDA build of torch and the
# package installed with its test extra: PYTHON=python bash benchmarks/gpu_check.sh
# Prepared on a CPU-only machine: not run yet.
set -u
py=${PYTHON:-python}
export PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
"$py" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$out/device.txt"
tests="tests/test_hessian_monitor.py tests/test_spectrum_monitor.py tests/test_sharpness_monitor.py
       tests/test_gradient_norms.py tests/test_noise_scale_monitor.py tests/test_landscape_monitor.py
       tests/test_initializer.py tests/test_batch_size_scheduler.py tests/test_project_kinds.py"
# Tests that pin a CPU precision plugin or compare CPU-only mixed precision stay on the CPU;
# the two-process tests need two devices.
skip="not amp_unscaling and not bf16_mixed and not ddp"
for precision in 32-true 16-mixed bf16-mixed; do
    LANDSCAPE_TEST_ACCELERATOR=gpu LANDSCAPE_TEST_PRECISION=$precision \
        timeout 150 "$py" -m pytest -q -k "$skip" $tests 2>&1 | grep -E "^(FAILED|ERROR)|passed|failed" | tee "$out/tests_$precision.txt"
done
# SyncBatchNorm measured on CUDA by two ranks sharing the GPU over gloo; the composites
# that measurements run in place of kernels without a double backward, against CUDA's.
timeout 60 "$py" -m pytest -q -k cuda tests/test_distributed.py 2>&1 | grep -E "^(FAILED|ERROR)|passed|failed" | tee "$out/tests_sync_batch_norm.txt"
LANDSCAPE_TEST_ACCELERATOR=gpu timeout 60 "$py" -m pytest -q tests/test_composites.py 2>&1 | grep -E "^(FAILED|ERROR)|passed|failed" | tee "$out/tests_composites.txt"
timeout 150 "$py" benchmarks/monitor_overhead.py --accelerator gpu --steps 600 --repeats 2 2>&1 \
    | grep "|" | tee "$out/overhead.txt"
