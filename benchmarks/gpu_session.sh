#!/usr/bin/env bash
# The GPU session for issue 14: the acceptance suite with its result file, then the benchmarks.
# One PART per device command (each stays under the 10-minute limit); all output lands flat in $OUT.
# It installs nothing: install the wheels first (../shared/device/README.md), so that
# `python3 -c "import onnxruntime as o; print(o.get_available_providers())"` lists CUDAExecutionProvider.
#
#   ADM_COMMIT=<git rev-parse HEAD> bash benchmarks/gpu_session.sh PART
#
# PART (expected time on one H200; run them in this order on one warm machine, so later parts reuse
# the folders earlier ones left in $ADM_GPU_WORKDIR, default /tmp/adm-gpu):
#   suite-build    test_flow_gpu.py -k build: adm-export build --device cuda, AudioLDM-S size ~4-5 min
#   suite-stages   test_flow_gpu.py, the rest: every stage alone at AudioLDM-S size          ~5-6 min
#   suite-families test_families_gpu.py: every family's tiny model built on CUDA, generate  ~4 min
#   suite-matrix   test_matrix_gpu.py: reference model's FP16/INT8/FP8/W4A8/mixed builds on
#                  CUDA, CLI option matrix, parity against torch                            ~6 min
#   suite-engine   test_cuda_engine.py: every family's CUDA engine, options, refusals        ~5 min
#   suite-other    the rest of tests/gpu (serving, bundle runtime, BigVGAN, HTTP serve)     ~3-5 min
#   suite-all      the six suite parts above side by side in one command (the GPU is idle most of
#                  each part's time: CPU-side tracing, ModelOpt, ONNX export; 16 cores), then their
#                  results merged into gpu_suite.json/.md; ADM_SUITE_SECONDS (default 480) bounds it
#   prepare      the race's engines, if suite-build/-stages did not run on this machine      ~5 min
#   race         U-Net step latency: engines vs torch eager / torch.compile, batch 1/2/8      ~5-7 min
#   e2e          adm-export generate per clip, 4 and 64 clips, engines vs the torch pipeline  ~4-6 min
#   serve-load   benchmarks/serve_load.py on CUDA: reference-audioldm built on the GPU, bundled,
#                served with CUDA graphs; concurrency 1/8/32 vs sequential generate (issue 15)  ~5-8 min
#   smoke        the CPU checks of the suite and the benchmark script (no GPU needed)          ~3 min
#
# With 30 minutes of device time (install ~4 min): suite-all, race, e2e, serve-load, back to back on one
# warm machine (race and e2e reuse suite-all's folders; if the machine went cold between calls, prepare first).
#
# Files in $OUT: gpu_suite_<part>.json/.md (tests/gpu/report.py; merge the parts with
# `python -m tests.gpu.report merge A.json B.json --out benchmarks/results/gpu_suite`),
# speed_gpu_<phase>.json, and <part>.log (the whole console output).
set -uo pipefail
part=${1:?usage: gpu_session.sh suite-all|suite-build|suite-stages|suite-families|suite-matrix|suite-engine|suite-other|prepare|race|e2e|serve-load|smoke}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here" || exit 1
out=${OUT:-$here/gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 ADM_EXPORT_NO_PROGRESS=1
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
export ADM_GPU_WORKDIR=${ADM_GPU_WORKDIR:-/tmp/adm-gpu}
# The device copy of the tree is not a git checkout: the report takes the commit from here.
export ADM_COMMIT=${ADM_COMMIT:-unknown}
py=${PYTHON:-python3}
log="$out/$part.log"

# SIGINT (not TERM) at the deadline: pytest then still writes its report, the benchmark its JSON.
status=0
run() { timeout -s INT -k 20 "$1" "${@:2}" 2>&1 | tee -a "$log" || status=$?; }
# A part's time limit: 575 s alone; suite-all gives its parts what is left of its own bound.
limit=${ADM_PART_SECONDS:-575}

{ echo "part $part · $(date -u '+%F %T UTC') · commit $ADM_COMMIT"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null; } | tee "$log"
case "$part" in
  suite-build)
    run "$limit" "$py" -m pytest -q -rA tests/gpu/test_flow_gpu.py -k build --gpu-report "$out/gpu_suite_build" ;;
  suite-stages)
    run "$limit" "$py" -m pytest -q -rA tests/gpu/test_flow_gpu.py -k "not build" --gpu-report "$out/gpu_suite_stages" ;;
  suite-families)
    run "$limit" "$py" -m pytest -q -rA tests/gpu/test_families_gpu.py --gpu-report "$out/gpu_suite_families" ;;
  suite-matrix)
    run "$limit" "$py" -m pytest -q -rA tests/gpu/test_matrix_gpu.py --gpu-report "$out/gpu_suite_matrix" ;;
  suite-engine)
    run "$limit" "$py" -m pytest -q -rA tests/gpu/test_cuda_engine.py --gpu-report "$out/gpu_suite_engine" ;;
  suite-other)
    run "$limit" "$py" -m pytest -q -rA tests/gpu --ignore tests/gpu/test_flow_gpu.py --ignore tests/gpu/test_families_gpu.py \
      --ignore tests/gpu/test_matrix_gpu.py --ignore tests/gpu/test_cuda_engine.py --gpu-report "$out/gpu_suite_other" ;;
  suite-all)
    # The saved AudioLDM-S-sized folder first (the parts would otherwise all write it at once).
    run 120 "$py" -c "import sys; from tests.gpu.conftest import saved_pipeline; print(saved_pipeline(sys.argv[1]))" \
      "$ADM_GPU_WORKDIR"
    left=$(( ${ADM_SUITE_SECONDS:-480} - SECONDS ))
    pids=()
    for p in build stages families matrix engine other; do
      # Each part logs to its own file; a few threads each so that six share the 16 cores.
      OMP_NUM_THREADS=2 ADM_PART_SECONDS=$left bash "$0" "suite-$p" >/dev/null 2>&1 &
      pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || status=1; done
    for p in build stages families matrix engine other; do tail -n 3 "$out/suite-$p.log" | tee -a "$log"; done
    reports=("$out"/gpu_suite_{build,stages,families,matrix,engine,other}.json)
    existing=()
    for r in "${reports[@]}"; do [[ -f $r ]] && existing+=("$r"); done
    if ((${#existing[@]})); then
      run 60 "$py" -m tests.gpu.report merge "${existing[@]}" --out "$out/gpu_suite"
    else
      echo "no part wrote a result file" | tee -a "$log"; status=1
    fi ;;
  prepare)
    run 575 "$py" benchmarks/speed_gpu.py --phase prepare --workdir "$ADM_GPU_WORKDIR" --out "$out" --time-budget 540 ;;
  race)
    run 575 "$py" benchmarks/speed_gpu.py --phase race --workdir "$ADM_GPU_WORKDIR" --out "$out" --time-budget 480 ;;
  e2e)
    run 575 "$py" benchmarks/speed_gpu.py --phase e2e --workdir "$ADM_GPU_WORKDIR" --out "$out" --time-budget 480 ;;
  serve-load)
    run 575 "$py" benchmarks/serve_load.py --device cuda --cuda-graph --model reference-audioldm \
      --level-timeout 120 --out "$out/serve_load_gpu" ;;
  smoke)
    ADM_GPU_SUITE_DRY_RUN=cpu ADM_GPU_WORKDIR=/tmp/adm-smoke run "$limit" "$py" -m pytest -q -x tests/gpu/test_families_gpu.py \
      -k tiny-audioldm --gpu-report "$out/gpu_suite_smoke"
    run 575 "$py" benchmarks/speed_gpu.py --smoke --device cpu --workdir /tmp/adm-smoke --out "$out" ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
echo "part $part done: exit $status · $(date -u '+%T UTC')" | tee -a "$log"
exit "$status"
