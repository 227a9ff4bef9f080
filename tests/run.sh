#!/usr/bin/env bash
# Run the whole test suite: once in the PyTorch environment (-m "not jittor") and once in
# the Jittor environment (-m "not torch").  Pure-numpy tests run in both; cross-env tests
# run from the PyTorch env and start the Jittor env themselves.  A missing environment is
# an error, never a skip; the only skips are the opt-in parity-r50vd runs (RTDETR_PARITY_SLOW=1),
# and -rs prints their reason.  Extra arguments go to both pytest runs.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
tpy=${RTDETR_PARITY_TORCH_PYTHON:-$root/.venvs/torch/bin/python}
jpy=${RTDETR_PARITY_JITTOR_PYTHON:-$root/.venvs/jittor/bin/python}
export RTDETR_PARITY_TORCH_PYTHON=$tpy RTDETR_PARITY_JITTOR_PYTHON=$jpy
missing=0
for pair in "torch:$tpy" "jittor:$jpy"; do
  name=${pair%%:*}; py=${pair#*:}
  if [ ! -x "$py" ]; then
    echo "ERROR: the $name environment is missing ($py). Run: bash envs/setup.sh" >&2
    missing=1
  fi
done
[ $missing = 0 ] || { echo "0 passed, 1 failed"; exit 1; }
out=$(mktemp -d)
rc=0
echo "=== pytest in the PyTorch environment ($tpy)"
"$tpy" -m pytest -rs -m "not jittor" --junitxml="$out/torch.xml" "$@" || rc=1
echo "=== pytest in the Jittor environment ($jpy)"
"$jpy" -m pytest -rs -m "not torch" --junitxml="$out/jittor.xml" "$@" || rc=1
# One closing line over both runs.
"$tpy" - "$out/torch.xml" "$out/jittor.xml" <<'PY' || rc=1
import sys, xml.etree.ElementTree as ET
p = f = s = 0
for path in sys.argv[1:]:
    try:
        root = ET.parse(path).getroot()
    except Exception:
        print(f"no test report from {path}"); f += 1; continue
    for ts in root.iter("testsuite"):
        n, fl, er, sk = (int(ts.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        p += n - fl - er - sk; f += fl + er; s += sk
print(f"both environments: {p} passed, {f} failed, {s} skipped")
sys.exit(1 if (f or p == 0) else 0)
PY
rm -rf "$out"
exit $rc
