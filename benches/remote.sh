#!/usr/bin/env bash
# Remotes side by side against one local S3-compatible server (moto's, on a
# free loopback port), the targets of the object-storage issue:
#
#   benches/remote.sh [WORKDIR]          # default: /var/tmp/dsv-remote-bench
#   PEERS="rclone restic dvc" SKIP_MANY=1 benches/remote.sh
#
# 1. blobs (40 files, 1 GB): full push — dsv push, rclone copy (the transfer
#    limit for the same bytes), restic backup, dvc push; wall seconds.
# 2. after the blobs v2 edit (100 B inserted into 5 files, 4 KB overwritten
#    in 5): bytes sent to the server (counted by a proxy) and seconds.
# 3. clone (metadata only) of a dataset with 1,000 versions.
# 4. cat of one 25 MB file from a fresh clone of the 1 GB version: bytes
#    received from the server (counted by the proxy).
# 5. 25,000 small files: push seconds per byte against the sensor-CSV push.
#
# Needs: moto_server (pip install 'moto[server]'), a release build of dsv
# and dsv-gen (built here), and the peers: apt-get install rclone restic;
# pip install dvc dvc-s3. Prints a markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-/var/tmp/dsv-remote-bench}"
PEERS="${PEERS:-rclone restic dvc}"
TARGET="${CARGO_TARGET_DIR:-target}"
[ -n "${DSV:-}" ] && [ -n "${GEN:-}" ] || cargo build --release -q -p dsv-cli -p dsv-benches
DSV="${DSV:-$TARGET/release/dsv}"
GEN="${GEN:-$TARGET/release/dsv-gen}"
DSV="$(realpath "$DSV")"; GEN="$(realpath "$GEN")"
mkdir -p "$WORK"
# Local plain-HTTP endpoints: a CA bundle from the environment only trips the peers.
unset AWS_CA_BUNDLE
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_DEFAULT_REGION=us-east-1 RESTIC_PASSWORD=bench
have() { command -v "$1" >/dev/null 2>&1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

PORT=$(free_port); PPORT=$(free_port)
moto_server -H 127.0.0.1 -p "$PORT" >"$WORK/moto.log" 2>&1 & MOTO=$!
# A byte-counting TCP proxy in front of it (client→server and server→client).
cat > "$WORK/proxy.py" <<'EOF'
import asyncio, sys
listen, target, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
n = [0, 0]
async def pipe(r, w, i):
    try:
        while True:
            b = await r.read(1 << 16)
            if not b:
                break
            n[i] += len(b)
            w.write(b)
            await w.drain()
    except Exception:
        pass
    finally:
        w.close()
async def handle(cr, cw):
    sr, sw = await asyncio.open_connection("127.0.0.1", target)
    await asyncio.gather(pipe(cr, sw, 0), pipe(sr, cw, 1))
async def report():
    while True:
        await asyncio.sleep(0.1)
        open(out + ".tmp", "w").write(f"{n[0]} {n[1]}\n")
        import os; os.replace(out + ".tmp", out)
async def main():
    srv = await asyncio.start_server(handle, "127.0.0.1", listen)
    asyncio.create_task(report())
    async with srv:
        await srv.serve_forever()
asyncio.run(main())
EOF
python3 "$WORK/proxy.py" "$PPORT" "$PORT" "$WORK/bytes" & PROXY=$!
trap 'kill $MOTO $PROXY 2>/dev/null || true' EXIT
EP="http://127.0.0.1:$PORT"; PEP="http://127.0.0.1:$PPORT"
for _ in $(seq 100); do curl -s "$EP" >/dev/null 2>&1 && break; sleep 0.2; done
for _ in $(seq 100); do [ -f "$WORK/bytes" ] && break; sleep 0.1; done
bucket() { curl -s -X PUT "$EP/$1" >/dev/null; }
counted() { sleep 0.3; cat "$WORK/bytes"; }       # "sent received" so far
secs() { local s; s=$(date +%s.%N); "$@" >/dev/null 2>"$WORK/.err" || { cat "$WORK/.err" >&2; return 1; }; echo "$(date +%s.%N) - $s" | bc; }
mb() { echo "scale=2; $1 / 1048576" | bc; }
row() { printf '| %s | %s | %s | %s |\n' "$@"; }
export RCLONE_CONFIG_B_TYPE=s3 RCLONE_CONFIG_B_PROVIDER=Other RCLONE_CONFIG_B_ENDPOINT="$EP" \
  RCLONE_CONFIG_B_ACCESS_KEY_ID=bench RCLONE_CONFIG_B_SECRET_ACCESS_KEY=bench
export RCLONE_CONFIG_P_TYPE=s3 RCLONE_CONFIG_P_PROVIDER=Other RCLONE_CONFIG_P_ENDPOINT="$PEP" \
  RCLONE_CONFIG_P_ACCESS_KEY_ID=bench RCLONE_CONFIG_P_SECRET_ACCESS_KEY=bench

echo "| scenario | tool | seconds | bytes / note |"
echo "|---|---|---|---|"
# ---- 1 and 2: blobs -----------------------------------------------------------
data="$WORK/blobs/data"
if [ ! -d "$data" ]; then mkdir -p "$data"; "$GEN" binary "$data"; fi
logical=$(du -sb "$data" | cut -f1)
for tool in dsv $PEERS; do
  have "$tool" || [ "$tool" = dsv ] || { row blobs "$tool" "not installed" ""; continue; }
  src="$WORK/blobs/$tool-data"; rm -rf "$src" "$WORK/blobs/$tool-repo"; cp -a "$data" "$src"; sync
  bucket "b$tool"; bucket "p$tool"
  case $tool in
    dsv)
      repo="$WORK/blobs/dsv-repo"; "$DSV" init "$repo" >/dev/null
      "$DSV" --repo "$repo" -q dataset sync bench/blobs "$src" >/dev/null
      "$DSV" --repo "$repo" remote add origin s3://bdsv/r --endpoint "$EP" >/dev/null
      t=$(secs "$DSV" --repo "$repo" -q push)
      row "blobs full push ($(mb "$logical") MB)" dsv "$t" "$("$DSV" --repo "$repo" stats --json 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("stored_bytes", ""))' 2>/dev/null) B stored locally"
      # The edit, through the counting proxy.
      "$DSV" --repo "$repo" remote add counted s3://bdsv/r --endpoint "$PEP" >/dev/null
      "$DSV" --repo "$repo" -q fetch counted >/dev/null
      "$GEN" edit-binary "$src"
      "$DSV" --repo "$repo" -q dataset sync bench/blobs "$src" >/dev/null
      read -r s0 r0 < <(counted)
      t=$(secs "$DSV" --repo "$repo" -q push counted)
      read -r s1 r1 < <(counted)
      row "blobs v2 edit push" dsv "$t" "$((s1 - s0)) B sent"
      # Clone of the 1 GB version, cat of one file: bytes received.
      rm -rf "$WORK/blobs/dsv-clone"
      read -r s0 r0 < <(counted)
      t=$(secs "$DSV" clone s3://bdsv/r "$WORK/blobs/dsv-clone" --endpoint "$PEP")
      read -r s1 r1 < <(counted)
      row "clone of the 1 GB dataset (metadata)" dsv "$t" "$((r1 - r0)) B received"
      f=$(cd "$src" && ls | head -1); fsize=$(stat -c %s "$src/$f")
      read -r s0 r0 < <(counted)
      t=$(secs "$DSV" --repo "$WORK/blobs/dsv-clone" dataset cat bench/blobs@1.0.0 "$f")
      read -r s1 r1 < <(counted)
      row "cat one $(mb "$fsize") MB file from the clone" dsv "$t" "$((r1 - r0)) B received"
      ;;
    rclone)
      t=$(secs rclone copy --transfers 8 "$src" "B:brclone/data")
      row "blobs full push" "rclone copy" "$t" "the bytes themselves"
      "$GEN" edit-binary "$src"
      read -r s0 r0 < <(counted)
      t=$(secs rclone copy --transfers 8 "$src" "P:brclone/data")
      read -r s1 r1 < <(counted)
      row "blobs v2 edit push" "rclone copy" "$t" "$((s1 - s0)) B sent (to an empty prefix: whole files)"
      ;;
    restic)
      restic -q -r "s3:$EP/brestic" init >/dev/null
      t=$(secs restic -q -r "s3:$EP/brestic" backup "$src")
      row "blobs full push" restic "$t" ""
      "$GEN" edit-binary "$src"
      read -r s0 r0 < <(counted)
      t=$(secs restic -q -r "s3:$PEP/brestic" backup "$src")
      read -r s1 r1 < <(counted)
      row "blobs v2 edit push" restic "$t" "$((s1 - s0)) B sent"
      ;;
    dvc)
      d="$WORK/blobs/dvc-repo"; mkdir -p "$d"; mv "$src" "$d/data"
      (cd "$d" && git init -q . && dvc init -q && dvc config cache.type hardlink \
        && dvc remote add -q -d s3 s3://bdvc/store && dvc remote modify s3 endpointurl "$EP" \
        && dvc remote add -q p s3://bdvc/store && dvc remote modify p endpointurl "$PEP" \
        && dvc add -q data >/dev/null)
      t=$(cd "$d" && secs dvc push -q -r s3)
      row "blobs full push" "dvc push" "$t" "(after dvc add)"
      "$GEN" edit-binary "$d/data"
      (cd "$d" && dvc add -q data >/dev/null)
      read -r s0 r0 < <(counted)
      t=$(cd "$d" && secs dvc push -q -r p)
      read -r s1 r1 < <(counted)
      row "blobs v2 edit push" "dvc push" "$t" "$((s1 - s0)) B sent"
      ;;
  esac
done

# ---- 3: clone of 1,000 versions ---------------------------------------------------
repo="$WORK/many/repo"; rm -rf "$WORK/many"; mkdir -p "$WORK/many/d"; "$DSV" init "$repo" >/dev/null
for i in $(seq 1000); do
  echo "row,$i" > "$WORK/many/d/labels.csv"
  "$DSV" --repo "$repo" -q dataset sync bench/many "$WORK/many/d" >/dev/null
done
bucket bmany
"$DSV" --repo "$repo" remote add origin s3://bmany/r --endpoint "$EP" >/dev/null
t=$(secs "$DSV" --repo "$repo" -q push)
row "push of 1,000 versions" dsv "$t" ""
t=$(secs "$DSV" clone s3://bmany/r "$WORK/many/clone" --endpoint "$EP")
row "clone (metadata) of 1,000 versions" dsv "$t" "$("$DSV" --repo "$WORK/many/clone" --json dataset list bench/many | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))') versions"

# ---- 5: small files against the sensor CSV -------------------------------------
if [ -z "${SKIP_MANY:-}" ]; then
  for sc in small csv; do
    d="$WORK/$sc/data"; [ -d "$d" ] || { mkdir -p "$d"; "$GEN" "$sc" "$d"; }
    r="$WORK/$sc/repo"; rm -rf "$r"; "$DSV" init "$r" >/dev/null
    "$DSV" --repo "$r" -q dataset sync "bench/$sc" "$d" >/dev/null
    bucket "b$sc"
    "$DSV" --repo "$r" remote add origin "s3://b$sc/r" --endpoint "$EP" >/dev/null
    t=$(secs "$DSV" --repo "$r" -q push)
    n=$(du -sb "$d" | cut -f1)
    row "$sc push ($(mb "$n") MB, $(find "$d" -type f | wc -l) files)" dsv "$t" "$(echo "scale=2; $t * 1000000000 / $n" | bc) s/GB"
  done
fi
