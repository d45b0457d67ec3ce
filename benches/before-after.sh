#!/usr/bin/env bash
# Two builds of dsv side by side, in one run, on the same data (a change's
# regression check). Needs only the two binaries (no generator build):
#
#   benches/before-after.sh OLD_DSV NEW_DSV [WORKDIR]
#
#   - ingest of 1 GB (1,000 files of 1 MiB from /dev/urandom) into a fresh
#     repository, then of the same folder after 10 files changed;
#   - no-op `dataset sync` of 25,000 small files (hyperfine);
#   - the retraining loop (benches/loop.sh: train + evaluate, queue
#     overhead, finalize → task running).
# Runs alternate OLD, NEW, OLD, NEW… so that drift hits both alike.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD="$(realpath "$1")"; NEW="$(realpath "$2")"
WORK="${3:-/var/tmp/dsv-before-after}"
RUNS="${RUNS:-3}"
command -v hyperfine >/dev/null || { echo "needs hyperfine (apt-get install hyperfine)" >&2; exit 1; }
mkdir -p "$WORK"
big="$WORK/big"; small="$WORK/small"
if [ ! -d "$big" ]; then
  mkdir -p "$big"
  for i in $(seq -w 1 1000); do head -c 1048576 /dev/urandom > "$big/f$i.bin"; done
fi
if [ ! -d "$small" ]; then
  mkdir -p "$small"
  python3 - "$small" <<'PY'
import os, sys, random
r = random.Random(7)
root = sys.argv[1]
for d in range(250):
    os.makedirs(f"{root}/d{d:03}", exist_ok=True)
    for f in range(100):
        with open(f"{root}/d{d:03}/f{f:03}.csv", "w") as fh:
            fh.write("".join(f"{r.random():.6f},{r.randint(0, 9)}\n" for _ in range(r.randint(5, 40))))
PY
fi
t() { /usr/bin/time -f "%e" -o "$WORK/.t" "$@" >/dev/null 2>"$WORK/.err" || { cat "$WORK/.err" >&2; exit 1; }; cat "$WORK/.t"; }
echo "| measure | run | old s | new s |"
echo "|---|---|---|---|"
for r in $(seq 1 "$RUNS"); do
  row=()
  for which in old new; do
    bin=$OLD; [ $which = new ] && bin=$NEW
    repo="$WORK/repo-$which"; rm -rf "$repo"; "$bin" init "$repo" >/dev/null
    sync
    first=$(t "$bin" --repo "$repo" -q dataset sync bench/big "$big")
    cp -a "$big" "$WORK/big-edit-$which"
    for i in 0001 0100 0200 0300 0400 0500 0600 0700 0800 0900; do
      head -c 4096 /dev/urandom | dd of="$WORK/big-edit-$which/f$i.bin" bs=4096 seek=3 conv=notrunc status=none
    done
    edit=$(t "$bin" --repo "$repo" -q dataset sync bench/big "$WORK/big-edit-$which")
    rm -rf "$WORK/big-edit-$which"
    row+=("$first" "$edit")
  done
  echo "| ingest 1 GB (1,000 files) | $r | ${row[0]} | ${row[2]} |"
  echo "| re-sync after 10 files changed | $r | ${row[1]} | ${row[3]} |"
done
for which in old new; do
  bin=$OLD; [ $which = new ] && bin=$NEW
  repo="$WORK/small-$which"; rm -rf "$repo"; "$bin" init "$repo" >/dev/null
  "$bin" --repo "$repo" -q dataset sync bench/small "$small" >/dev/null
  "$bin" --repo "$repo" -q dataset sync bench/small "$small" >/dev/null
done
hyperfine -N --warmup 2 --runs 10 --export-markdown "$WORK/noop.md" \
  -n old "$OLD --repo $WORK/small-old -q dataset sync bench/small $small" \
  -n new "$NEW --repo $WORK/small-new -q dataset sync bench/small $small" >/dev/null
echo; echo "no-op sync of 25,000 files:"; cat "$WORK/noop.md"
for which in old new; do
  bin=$OLD; [ $which = new ] && bin=$NEW
  echo; echo "loop ($which):"
  DSV="$bin" benches/loop.sh "${LOOP_RUNS:-5}" 2>&1 | tail -6
done
