#!/usr/bin/env bash
# Read-side figures (the targets of the read-side issue), with the peers in
# the same run: `dvc checkout` (hardlink cache and copy cache) and
# `restic restore`.
#
#   benches/readside.sh [WORKDIR]                   # default: /var/tmp/dsv-readside
#   SCENARIOS="binary small" PEERS="dvc restic" benches/readside.sh
#
# binary = 40 files / 1 GB (dsv-gen binary); small = 25,000 small files.
# Every tool reads a warm page cache (the data was just written), as a user
# re-running would. Mount figures: sequential = `cat` of every file through
# a fresh mount (new inodes, nothing cached by the kernel); random = 4 KiB
# preads at random offsets of random files, one reader, run first on the
# fresh mount.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-/var/tmp/dsv-readside}"
SCENARIOS="${SCENARIOS:-binary small}"
PEERS="${PEERS:-dvc restic}"
TARGET="${CARGO_TARGET_DIR:-target}"
cargo build --release -q -p dsv-cli -p dsv-benches
DSV="$TARGET/release/dsv"
GEN="$TARGET/release/dsv-gen"
mkdir -p "$WORK"
export RESTIC_PASSWORD=bench
have() { command -v "$1" >/dev/null 2>&1; }
# secs CMD... → wall seconds with 3 decimals
secs() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>"$WORK/.err" || { cat "$WORK/.err" >&2; return 1; }; t1=$(date +%s.%N); echo "$t1 - $t0" | bc -l | xargs printf '%.3f'; }
row() { printf '| %s | %s | %s |\n' "$@"; }

echo "| scenario | tool · operation | seconds (or rate) |"
echo "|---|---|---|"
for sc in $SCENARIOS; do
  data="$WORK/$sc/data"
  if [ ! -d "$data" ]; then mkdir -p "$data"; "$GEN" "$sc" "$data"; fi
  repo="$WORK/$sc/dsv"
  rm -rf "$repo"; "$DSV" init "$repo" >/dev/null
  "$DSV" --repo "$repo" -q dataset sync bench/$sc "$data" >/dev/null
  rm -rf "$repo/.dsv/cache"
  row "$sc" "dsv dataset get (first)" "$(secs "$DSV" --repo "$repo" -q dataset get bench/$sc)"
  if have hyperfine; then
    ms=$(hyperfine -N -w 3 -r 30 --export-json "$WORK/.hf.json" "$DSV --repo $repo -q dataset get bench/$sc" >/dev/null 2>&1 \
      && python3 -c "import json;print('%.1f ms' % (json.load(open('$WORK/.hf.json'))['results'][0]['mean']*1000))")
    row "$sc" "dsv dataset get (again, mean of 30)" "$ms"
  fi
  rm -rf "$WORK/$sc/copy"
  row "$sc" "dsv dataset copy" "$(secs "$DSV" --repo "$repo" -q dataset copy bench/$sc "$WORK/$sc/copy")"
  rm -rf "$WORK/$sc/copy"
  # Through a FUSE mount.
  mnt="$WORK/$sc/mnt"; mkdir -p "$mnt"; fusermount3 -u "$mnt" 2>/dev/null || true
  "$DSV" --repo "$repo" --json dataset mount bench/$sc "$mnt" > "$WORK/.mount" 2>&1 &
  mpid=$!
  for _ in $(seq 100); do mountpoint -q "$mnt" && break; sleep 0.1; done
  if [ "$sc" = binary ]; then
    rate=$(python3 - "$mnt" <<'EOF'
import os, random, sys, time
root = sys.argv[1]
files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
fds = [(os.open(f, os.O_RDONLY), os.path.getsize(f)) for f in files]
random.seed(7)
n = 20000
t = time.time()
for _ in range(n):
    fd, size = random.choice(fds)
    os.pread(fd, 4096, random.randrange(0, max(1, size - 4096)))
print("%.0f reads/s" % (n / (time.time() - t)))
EOF
)
    row "$sc" "dsv mount: random 4 KiB reads (fresh mount)" "$rate"
  fi
  bytes=$(du -sb --apparent-size "$data" | cut -f1)
  s=$(secs sh -c "find '$mnt' -type f -print0 | xargs -0 cat > /dev/null")
  row "$sc" "dsv mount: sequential read" "$(echo "$bytes / $s / 1000000" | bc -l | xargs printf '%.0f') MB/s ($s s)"
  kill -TERM $mpid; wait $mpid || true
  for tool in $PEERS; do
    have "$tool" || { row "$sc" "$tool" "not installed"; continue; }
    case $tool in
      dvc)
        for kind in hardlink copy; do
          d="$WORK/$sc/dvc-$kind"; rm -rf "$d"; mkdir -p "$d"; cp -a "$data" "$d/data"
          (cd "$d" && git init -q . && dvc init -q && dvc config cache.type "$kind" && dvc add -q data >/dev/null 2>&1)
          rm -rf "$d/data"
          row "$sc" "dvc checkout ($kind cache)" "$(cd "$d" && secs dvc checkout -q)"
          rm -rf "$d"
        done ;;
      restic)
        r="$WORK/$sc/restic"; rm -rf "$r" "$WORK/$sc/restore"
        restic init -q -r "$r" >/dev/null; restic -r "$r" backup -q "$data" >/dev/null
        row "$sc" "restic restore" "$(secs restic -r "$r" restore latest -q --target "$WORK/$sc/restore")"
        rm -rf "$r" "$WORK/$sc/restore" ;;
    esac
  done
done
