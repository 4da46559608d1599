#!/usr/bin/env bash
# adm-export quality gate for CI: build the engine, evaluate it against the full-precision
# baseline, compare with a committed baseline report, print a diff table.
#
# Exit status: 0 gate passed · 2 gate failed (quality or size regressed) · 1 error (bad
# arguments, missing baseline, build error).
#
# Every option has an environment variable (for compose files and CI variables); an option
# given on the command line wins. Run with --help for the list.
set -uo pipefail

usage() {
  cat <<'EOF'
usage: ci-gate.sh --baseline FILE [options] [-- extra adm-export build arguments]

Builds with `adm-export build`, then compares the build with FILE (`adm-export compare`).
Without extra build arguments the build uses the arguments recorded in the baseline, so the
evaluation protocol (clips, steps, clip length, embedder) matches it.

  --baseline FILE       committed baseline report                     ADM_GATE_BASELINE
  --model M             model id, folder or embedded name             ADM_GATE_MODEL
  --precision P         int8|fp8|w4a8|mixed                           ADM_GATE_PRECISION
  --engine E            onnxruntime|tensorrt|tensorrt-rtx             ADM_GATE_ENGINE
  --device D            cpu|cuda                                      ADM_GATE_DEVICE
  --max-fd-increase X   the build's absolute quality gate (%)         ADM_GATE_MAX_FD_INCREASE
  --out DIR             build output + gate.json/gate.md (./adm-gate) ADM_GATE_OUT
  --cache DIR           persistent caches (mount a volume here)       ADM_GATE_CACHE
  --build-dir DIR       compare this existing build; do not build     ADM_GATE_BUILD_DIR
  --fd-tolerance PP     allowed FD-increase rise, percentage points   ADM_GATE_FD_TOLERANCE (10)
  --size-tolerance PCT  allowed growth of the exported U-Net, %       ADM_GATE_SIZE_TOLERANCE (1)
  --layer-tolerance PCT allowed drop of quantized layers, %           ADM_GATE_LAYER_TOLERANCE (5)
  --drift-tolerance PP  allowed paired-drift rise, percentage points  ADM_GATE_DRIFT_TOLERANCE (5)
  --update-baseline     write FILE from this build instead of gating  ADM_GATE_UPDATE_BASELINE=1
  -h, --help            this text
Extra build arguments may also come from ADM_GATE_BUILD_ARGS (split on whitespace).
EOF
}

die() {
  echo "ci-gate: error: $*" >&2
  exit 1
}

is_number() { [[ "$1" =~ ^[0-9]+([.][0-9]+)?$ ]]; }

BASELINE=${ADM_GATE_BASELINE:-}
MODEL=${ADM_GATE_MODEL:-}
PRECISION=${ADM_GATE_PRECISION:-}
ENGINE=${ADM_GATE_ENGINE:-}
DEVICE=${ADM_GATE_DEVICE:-}
MAX_FD=${ADM_GATE_MAX_FD_INCREASE:-}
OUT=${ADM_GATE_OUT:-adm-gate}
CACHE=${ADM_GATE_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/adm-export-ci}
BUILD_DIR=${ADM_GATE_BUILD_DIR:-}
FD_TOL=${ADM_GATE_FD_TOLERANCE:-10}
SIZE_TOL=${ADM_GATE_SIZE_TOLERANCE:-1}
LAYER_TOL=${ADM_GATE_LAYER_TOLERANCE:-5}
DRIFT_TOL=${ADM_GATE_DRIFT_TOLERANCE:-5}
UPDATE=${ADM_GATE_UPDATE_BASELINE:-0}
ADM=${ADM_GATE_ADM_EXPORT:-adm-export}
EXTRA=()
if [[ -n "${ADM_GATE_BUILD_ARGS:-}" ]]; then
  read -r -a EXTRA <<<"$ADM_GATE_BUILD_ARGS"
fi

# 1. Arguments.
need_value() { [[ $# -ge 2 && -n "$2" ]] || die "option $1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --baseline) need_value "$@"; BASELINE=$2; shift 2 ;;
    --model) need_value "$@"; MODEL=$2; shift 2 ;;
    --precision) need_value "$@"; PRECISION=$2; shift 2 ;;
    --engine) need_value "$@"; ENGINE=$2; shift 2 ;;
    --device) need_value "$@"; DEVICE=$2; shift 2 ;;
    --max-fd-increase) need_value "$@"; MAX_FD=$2; shift 2 ;;
    --out) need_value "$@"; OUT=$2; shift 2 ;;
    --cache) need_value "$@"; CACHE=$2; shift 2 ;;
    --build-dir) need_value "$@"; BUILD_DIR=$2; shift 2 ;;
    --fd-tolerance) need_value "$@"; FD_TOL=$2; shift 2 ;;
    --size-tolerance) need_value "$@"; SIZE_TOL=$2; shift 2 ;;
    --layer-tolerance) need_value "$@"; LAYER_TOL=$2; shift 2 ;;
    --drift-tolerance) need_value "$@"; DRIFT_TOL=$2; shift 2 ;;
    --update-baseline) UPDATE=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; EXTRA+=("$@"); break ;;
    *) die "unknown option '$1' (build arguments go after '--'; see --help)" ;;
  esac
done

[[ -n "$BASELINE" ]] || die "no baseline: pass --baseline FILE or set ADM_GATE_BASELINE"
for pair in "--fd-tolerance:$FD_TOL" "--size-tolerance:$SIZE_TOL" "--layer-tolerance:$LAYER_TOL" \
  "--drift-tolerance:$DRIFT_TOL"; do
  is_number "${pair#*:}" || die "invalid ${pair%%:*} '${pair#*:}': give a number >= 0"
done
[[ -z "$MAX_FD" ]] || is_number "$MAX_FD" || die "invalid --max-fd-increase '$MAX_FD': give a number >= 0"
[[ "$UPDATE" == 1 || "$UPDATE" == 0 ]] || die "invalid ADM_GATE_UPDATE_BASELINE '$UPDATE': use 0 or 1"
command -v "$ADM" >/dev/null 2>&1 || die "'$ADM' not found: install adm-export or set ADM_GATE_ADM_EXPORT"

# 2. The baseline's recorded build arguments (a missing or broken baseline fails here, before
#    minutes of building). When updating, a missing baseline just means "start from defaults".
BASE_ARGS=()
if [[ -f "$BASELINE" ]]; then
  recorded=$("$ADM" compare --baseline "$BASELINE" --show-build-args) || die "cannot read --baseline '$BASELINE'"
  if [[ -n "$recorded" ]]; then
    mapfile -t BASE_ARGS <<<"$recorded"
  fi
elif [[ "$UPDATE" != 1 ]]; then
  die "--baseline '$BASELINE' does not exist (create one with --update-baseline)"
fi

# Later occurrences of an option win in adm-export's parser: baseline, then options, then extras.
OVERRIDES=()
[[ -z "$MODEL" ]] || OVERRIDES+=(--model "$MODEL")
[[ -z "$PRECISION" ]] || OVERRIDES+=(--precision "$PRECISION")
[[ -z "$ENGINE" ]] || OVERRIDES+=(--engine "$ENGINE")
[[ -z "$DEVICE" ]] || OVERRIDES+=(--device "$DEVICE")
[[ -z "$MAX_FD" ]] || OVERRIDES+=(--max-fd-increase "$MAX_FD")
BUILD_ARGS=("${BASE_ARGS[@]}" "${OVERRIDES[@]}" "${EXTRA[@]}")

# 3. Caches in one folder (mount a volume there): model downloads, embedder checkpoints, torch
#    extensions that ModelOpt compiles on first GPU use, matplotlib's font cache.
mkdir -p "$CACHE" || die "cannot create --cache '$CACHE'"
export HF_HOME=${HF_HOME:-$CACHE/huggingface}
export TORCH_HOME=${TORCH_HOME:-$CACHE/torch}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$CACHE/torch_extensions}
export MPLCONFIGDIR=${MPLCONFIGDIR:-$CACHE/matplotlib}
export ADM_EXPORT_NO_PROGRESS=${ADM_EXPORT_NO_PROGRESS:-1}

# 4. Build (unless comparing an existing build).
mkdir -p "$OUT" || die "cannot create --out '$OUT'"
build_rc=0
if [[ -z "$BUILD_DIR" ]]; then
  BUILD_DIR="$OUT/build"
  # `adm-export build --force` empties its folder: only ever point it at an earlier build.
  if [[ -e "$BUILD_DIR" && -n "$(ls -A "$BUILD_DIR" 2>/dev/null)" && ! -e "$BUILD_DIR/calibration" && ! -e "$BUILD_DIR/report.json" ]]; then
    die "'$BUILD_DIR' is not empty and not an earlier build; choose another --out"
  fi
  echo "ci-gate: adm-export build --out $BUILD_DIR ${BUILD_ARGS[*]}" >&2
  start=$(date +%s)
  "$ADM" build --out "$BUILD_DIR" --force "${BUILD_ARGS[@]}"
  build_rc=$?
  echo "ci-gate: build finished in $(($(date +%s) - start)) s (exit $build_rc)" >&2
  case "$build_rc" in
    0) ;;
    2) echo "ci-gate: the build's own quality gate failed; comparing anyway" >&2 ;;
    *) die "adm-export build failed (exit $build_rc)" ;;
  esac
elif [[ ! -d "$BUILD_DIR" ]]; then
  die "--build-dir '$BUILD_DIR' does not exist"
fi

# 5. Compare (or freeze this build as the new baseline).
if [[ "$UPDATE" == 1 ]]; then
  [[ "$build_rc" == 0 ]] || die "the build failed its own quality gate; not writing a baseline from it"
  record=()
  for a in "${BUILD_ARGS[@]}"; do record+=("--build-arg=$a"); done
  "$ADM" compare "$BUILD_DIR" --baseline "$BASELINE" --write-baseline "${record[@]}" || die "could not write the baseline"
  exit 0
fi
"$ADM" compare "$BUILD_DIR" --baseline "$BASELINE" --fd-tolerance "$FD_TOL" --size-tolerance "$SIZE_TOL" \
  --layer-tolerance "$LAYER_TOL" --drift-tolerance "$DRIFT_TOL" --summary "$OUT/gate.md" --json-out "$OUT/gate.json"
compare_rc=$?
case "$compare_rc" in
  0) [[ "$build_rc" == 0 ]] && exit 0 || exit 2 ;;
  2) exit 2 ;;
  *) die "adm-export compare failed (exit $compare_rc)" ;;
esac
