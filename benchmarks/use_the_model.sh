#!/usr/bin/env bash
# The tour train -> predict -> export (hf, onnx) -> serve + curl, each command with its output,
# written to benchmarks/results/use_the_model.md. Run from the repository root:
#   flock /tmp/smallshot-heavy.lock bash benchmarks/use_the_model.sh     # ~10 min on 2 cores
set -euo pipefail
export PYTHONPATH="$PWD" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled
PY=.venv/bin/python
OUT=benchmarks/results/use_the_model.md
RUN=runs/tour/sst2-minilm
PORT=${PORT:-8000}
SENTENCES='an utterly charming , beautifully acted little film .
the jokes fall flat and the story drags on forever .
a visual feast with a hollow heart .
i laughed , i cried , i want to see it again .
tedious , predictable and far too long .'

step() {  # step "title" command...: run it, put the command and its output in the note
  local title=$1; shift
  echo "running: $*" >&2
  local t0=$SECONDS
  local out
  out=$("$@" 2>&1 | grep -v -E 'Warning|warnings.warn|UserWarning|FutureWarning|real_accelerator|^\s*$' ) || true
  { echo "## $title"; echo; echo '```console'; echo "\$ $*"; echo "$out"; echo '```';
    echo "($((SECONDS - t0)) s)"; echo; } >> "$OUT"
}

{ echo "# Use the model: train -> predict -> export -> serve"; echo
  echo "Run by \`benchmarks/use_the_model.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores"
  echo "shared with other jobs (load average $(cut -d' ' -f1 /proc/loadavg) at the start)."
  echo "The recipe as written (15 epochs, K=16 per class, 400 test sentences); no overrides but"
  echo "where the run folder goes."; echo; } > "$OUT"

step "Train configs/sst2-minilm.yaml" $PY launch.py train configs/sst2-minilm.yaml \
  train.output_dir=runs/tour train.run_name=sst2-minilm train.progress=false
printf '%s\n' "$SENTENCES" > runs/tour/new.txt
step "Predict 5 new sentences (stdin, one per line)" \
  bash -c "$PY launch.py predict $RUN - --no-progress < runs/tour/new.txt"
rm -rf runs/tour/export-hf runs/tour/export-onnx
step "Export as a Hugging Face folder" $PY launch.py export $RUN --format hf --out runs/tour/export-hf
step "Load it with transformers alone (no smallshot import)" $PY -c "
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
d = 'runs/tour/export-hf'
model = AutoModelForSequenceClassification.from_pretrained(d, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
texts = open('runs/tour/new.txt').read().splitlines()
with torch.no_grad():
    probs = model(**tok(texts, padding=True, truncation=True, max_length=64, return_tensors='pt')).logits.softmax(-1)
for t, p in zip(texts, probs):
    print(model.config.id2label[int(p.argmax())], f'{float(p.max()):.4f}', t, sep='\t')
"
step "Export as ONNX (checked with onnxruntime)" $PY launch.py export $RUN --format onnx --out runs/tour/export-onnx
step "The export records" bash -c "$PY -c \"
import json
for d in ('runs/tour/export-hf', 'runs/tour/export-onnx'):
    r = json.load(open(d + '/smallshot-export.json'))
    print(d, {k: r[k] for k in ('format', 'max_abs_diff', 'source_sha256', 'classes')}, 'test/accuracy', r['metrics'].get('test/accuracy'))
\""

$PY launch.py serve runs/tour/export-hf --port "$PORT" --duration 600 > runs/tour/serve.log 2>&1 &
SERVE=$!
trap 'kill $SERVE 2>/dev/null || true' EXIT
t0=$SECONDS
until curl -sf "http://127.0.0.1:$PORT/" > /dev/null; do
  sleep 2
  if (( SECONDS - t0 > 400 )); then echo "serve did not come up" >&2; tail -20 runs/tour/serve.log >&2; exit 1; fi
done
{ echo "## Serve on Ray Serve and curl it"; echo; echo '```console'
  echo "\$ $PY launch.py serve runs/tour/export-hf --port $PORT &"
  grep -E '^serving|curl' runs/tour/serve.log || true
  echo "(ready after $((SECONDS - t0)) s)"; echo '```'; echo; } >> "$OUT"
BODY=$(python3 -c "import json; print(json.dumps({'texts': open('runs/tour/new.txt').read().splitlines()}))")
step "POST /predict" curl -s "http://127.0.0.1:$PORT/predict" -H 'Content-Type: application/json' -d "$BODY"
step "A bad request gets a 4xx" curl -s -w ' HTTP %{http_code}' "http://127.0.0.1:$PORT/predict" \
  -H 'Content-Type: application/json' -d '{"texts": "not a list"}'
kill -INT $SERVE; wait $SERVE || true
echo "written $OUT" >&2
