# Sourced by scripts/bench-quadrature and scripts/bench-precision (not run alone): the
# test models, the kn binary, the work folder, the three models they measure, and one
# `kn attribute` run with its seconds per prompt.
#
# KN=path/to/kn measures another build (default: target/release/kn, built first).
# KN_BENCH_WORK=dir keeps the runs there and skips those already finished (a long
# benchmark on a slow machine can be stopped and resumed); default: a temporary folder.
# KN_BENCH_MODELS: which of the three (default all).
bash scripts/fetch-test-models >/dev/null
if [ -z "${KN:-}" ]; then
  cargo build --release --quiet --bin kn
fi
kn=${KN:-target/release/kn}
if [ -n "${KN_BENCH_WORK:-}" ]; then
  work=$KN_BENCH_WORK
  mkdir -p "$work"
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi
declare -A model=(
  [antiberty]=models/antiberty
  [fact-model]=data/fact-model
  [smollm2]=models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
)
names=${KN_BENCH_MODELS:-antiberty fact-model smollm2}

# bench_attribute NAME LABEL OPTION…: `kn attribute` of model NAME on
# $work/NAME.facts.jsonl into $work/NAME.LABEL.jsonl (its log .log, its seconds per
# prompt .time); skipped when the .time of an earlier run is there.
bench_attribute() {
  local name=$1 label=$2
  shift 2
  [ -s "$work/$name.$label.time" ] && return 0
  echo "$(basename "$0"): $name $label" >&2
  "$kn" attribute --model "${model[$name]}" --fact "$work/$name.facts.jsonl" \
    --out "$work/$name.$label.jsonl" --force "$@" 2> "$work/$name.$label.log"
  sed -n 's/.*(\([0-9.]*\) s per prompt.*/\1/p' "$work/$name.$label.log" > "$work/$name.$label.time"
}
