#!/usr/bin/env bash
# Side-by-side ingest comparison of dsv with restic, borg and DVC on the same
# generated data sets (the targets of the storage-engine issue).
#
#   benches/compare.sh [WORKDIR]        # default: /var/tmp/dsv-compare
#   PEERS="restic borg dvc" SCENARIOS="binary csv small" benches/compare.sh
#
# Needs: a release build of dsv and dsv-gen (built here), and the peers:
#   apt-get install restic borgbackup time; pip install dvc
# Prints one markdown table; wall seconds from /usr/bin/time, stored bytes
# from du of each tool's repository. Caches are dropped for nobody: every
# tool reads the same warm page cache, as a user re-running would.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-/var/tmp/dsv-compare}"
PEERS="${PEERS:-restic borg dvc}"
SCENARIOS="${SCENARIOS:-binary csv small}"
TARGET="${CARGO_TARGET_DIR:-target}"
[ -n "${DSV:-}" ] && [ -n "${GEN:-}" ] || cargo build --release -q -p dsv-cli -p dsv-benches
DSV="${DSV:-$TARGET/release/dsv}"  # DSV=path: compare another build
GEN="${GEN:-$TARGET/release/dsv-gen}"
TIME=/usr/bin/time
mkdir -p "$WORK"
export RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes

have() { command -v "$1" >/dev/null 2>&1; }
du_b() { du -sb "$1" | cut -f1; }
# run LABEL CMD... → prints "seconds maxrss_kb"
timed() { $TIME -f "%e %M" -o "$WORK/.time" "$@" >/dev/null 2>"$WORK/.err" || { cat "$WORK/.err" >&2; return 1; }; cat "$WORK/.time"; }

row() { printf '| %s | %s | %s | %s | %s |\n' "$@"; }

ingest() { # tool repo data → "seconds rss"
  local tool=$1 repo=$2 data=$3
  case $tool in
    dsv) timed "$DSV" --repo "$repo" -q snapshot "$data" ;;
    restic) timed restic -r "$repo" backup -q "$data" ;;
    borg) timed borg create --compression zstd,3 "$repo::s$(date +%s%N)" "$data" ;;
    dvc) (cd "$data/.." && timed dvc add -q "$(basename "$data")") ;;
  esac
}
init() {
  local tool=$1 repo=$2 data=$3
  rm -rf "$repo"
  case $tool in
    dsv) "$DSV" init "$repo" >/dev/null ;;
    restic) restic init -q -r "$repo" >/dev/null ;;
    borg) borg init -e none "$repo" >/dev/null 2>&1 ;;
    dvc) rm -rf "$data/../.dvc" "$data/../.git" "$data.dvc"; (cd "$data/.." && git init -q . && dvc init -q && dvc config cache.type hardlink) ;;
  esac
}
stored() {
  local tool=$1 repo=$2 data=$3
  case $tool in
    dsv) du_b "$repo/.dsv" ;;
    dvc) du_b "$data/../.dvc/cache" ;;
    *) du_b "$repo" ;;
  esac
}

echo "| scenario | tool | ingest s (max RSS MB) | stored bytes | re-ingest / edit |"
echo "|---|---|---|---|---|"
for sc in $SCENARIOS; do
  data="$WORK/$sc/data"
  if [ ! -d "$data" ]; then mkdir -p "$data"; "$GEN" "$sc" "$data"; fi
  logical=$(du_b "$data")
  for tool in dsv $PEERS; do
    have "$tool" || [ "$tool" = dsv ] || { row "$sc" "$tool" "not installed" "" ""; continue; }
    # Each tool gets a fresh copy of the data when the scenario edits it.
    src="$data"
    if [ "$sc" != small ]; then src="$WORK/$sc/$tool-data"; rm -rf "$src"; cp -a "$data" "$src"; fi
    # Flush the copy (and the previous tool's repository) first: otherwise the
    # kernel writes that gigabyte back during the next tool's ingest.
    sync
    # Every tool reads a warm page cache: the data the scenario does not copy
    # may have been evicted by the previous scenarios' gigabytes.
    find "$src" -type f -print0 | xargs -0 cat > /dev/null
    repo="$WORK/$sc/$tool-repo"
    init "$tool" "$repo" "$src"
    read -r secs rss < <(ingest "$tool" "$repo" "$src")
    size=$(stored "$tool" "$repo" "$src")
    extra=""
    case $sc in
      small)
        read -r s2 _ < <(ingest "$tool" "$repo" "$src"); extra="unchanged re-ingest ${s2}s" ;;
      binary)
        "$GEN" edit-binary "$src"; read -r s2 _ < <(ingest "$tool" "$repo" "$src")
        extra="edit: +$(( $(stored "$tool" "$repo" "$src") - size )) bytes in ${s2}s" ;;
      csv)
        "$GEN" append-csv "$src"; read -r s2 _ < <(ingest "$tool" "$repo" "$src")
        extra="append: +$(( $(stored "$tool" "$repo" "$src") - size )) bytes in ${s2}s" ;;
    esac
    row "$sc ($logical B)" "$tool" "$secs ($((rss / 1024)))" "$size" "$extra"
  done
done
if [ "${BIG_MB:-0}" -gt 0 ]; then
  big="$WORK/big/file.bin"; mkdir -p "$WORK/big"
  [ -f "$big" ] || "$GEN" big "$big" "$BIG_MB"
  init dsv "$WORK/big/repo" "$WORK/big"
  read -r secs rss < <(ingest dsv "$WORK/big/repo" "$WORK/big")
  row "one ${BIG_MB} MB file" dsv "$secs ($((rss / 1024)))" "$(stored dsv "$WORK/big/repo" x)" ""
fi
# fsck --read-data throughput on the binary scenario's repository
if [ -d "$WORK/binary/dsv-repo" ]; then
  read -r secs _ < <(timed "$DSV" --repo "$WORK/binary/dsv-repo" fsck --read-data)
  echo
  echo "dsv fsck --read-data of the binary repository: ${secs}s for $(du_b "$WORK/binary/dsv-repo/.dsv/packs") stored bytes"
fi
