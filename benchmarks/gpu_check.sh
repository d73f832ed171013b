#!/usr/bin/env bash
# The GPU device check, one command (see docs/gpu.md):
#
#   bash benchmarks/gpu_check.sh OUT.json [--budget SECONDS] [--stages correctness,bsp,...]
#
# Runs every stage of benchmarks/gpu_check.py under its own time limit (about 5 minutes in
# all), writes ONE JSON file and prints a summary table. Nothing is downloaded: wheels brought
# along in .whl/ are installed from there (no index, into /tmp/hpcps-site); anything still
# missing is named in the JSON and its stages are skipped.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  # --prefix (not --target) keeps the shared libraries and programs of data wheels (mpich)
  site=/tmp/hpcps-site
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --ignore-installed --prefix "$site" .whl/*.whl || echo "gpu_check.sh: installing .whl/ failed"
  purelib=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_path('purelib', vars={'base': '$site', 'platbase': '$site'}))")
  platlib=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_path('platlib', vars={'base': '$site', 'platbase': '$site'}))")
  export PYTHONPATH=$purelib:$platlib${PYTHONPATH:+:$PYTHONPATH}
  export PATH=$site/bin:$PATH
  # a carried mpich sits outside every prefix mpi4py searches: point it there
  if [ -e "$site/lib/libmpi.so.12" ]; then
    export MPI4PY_LIBMPI=$site/lib/libmpi.so.12
    export LD_LIBRARY_PATH=$site/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
out=${1:-gpu_check.json}
[ $# -gt 0 ] && shift
exec "$PYTHON" benchmarks/gpu_check.py "$out" "$@"
