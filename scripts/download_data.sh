#!/usr/bin/env bash
# Official data into the layout the stages expect, verified by counts:
#   data/official/alfworld/json_2.1.1/{train,valid_seen,valid_unseen}  (3,553 / 140 / 134 solvable games)
#   data/official/virtualhome/{vh_seen_test.jsonl,vh_unseen_test.jsonl}  (247 / 247 tasks)
#   data/official/virtualhome/init_and_final_graphs/                     (scene graphs)
# Then: export ALFWORLD_DATA=data/official/alfworld VH_DATA=data/official/virtualhome
# The archives are the ones the STeCa README links on Google Drive (fetched with gdown) and alfworld's
# own download. Nothing already present is downloaded again.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-data/official}
PY=${PY:-.venv/bin/python}
# Google Drive ids from the STeCa README.
ALFWORLD_ZIP_ID=${ALFWORLD_ZIP_ID:-1y7Vqeo0_xm9d3I07vZaP6qbPFtyuJ6kI}
VH_ZIP_ID=${VH_ZIP_ID:-1kZKWkWhtJ-DneqfS1Nb_FybR1RBxPeef}
DATA_ZIP_ID=${DATA_ZIP_ID:-1tqZyqzyE7NnJdUJlwwfcwnPUFMafKdfA}

mkdir -p "$DEST/archives"
"$PY" -m pip install -q gdown 2>&1 | grep -v "^WARNING: Location" || true

fetch() {  # fetch <drive id> <file>
  local id=$1 out=$2
  [ -s "$out" ] && return 0
  if ! "$PY" -m gdown --quiet "$id" -O "$out.part"; then
    echo "download of $out failed (Google Drive id $id)." >&2
    echo "Offline or rate-limited? Download it in a browser into $out and rerun." >&2
    exit 1
  fi
  mv "$out.part" "$out"
}

count() { find "$1" -name "$2" | wc -l; }

if [ ! -d "$DEST/alfworld/json_2.1.1" ]; then
  fetch "$ALFWORLD_ZIP_ID" "$DEST/archives/alfworld_data.zip"
  mkdir -p "$DEST/alfworld" && unzip -q -n "$DEST/archives/alfworld_data.zip" -d "$DEST/alfworld"
  # the archive nests the data one folder deep in some releases
  found=$(find "$DEST/alfworld" -maxdepth 3 -type d -name json_2.1.1 | head -1)
  [ -n "$found" ] && [ "$found" != "$DEST/alfworld/json_2.1.1" ] && mv "$found" "$DEST/alfworld/json_2.1.1"
fi
if [ ! -f "$DEST/virtualhome/vh_seen_test.jsonl" ]; then
  fetch "$DATA_ZIP_ID" "$DEST/archives/data.zip"
  fetch "$VH_ZIP_ID" "$DEST/archives/virtualhome_master.zip"
  mkdir -p "$DEST/virtualhome/unpacked"
  unzip -q -n "$DEST/archives/data.zip" -d "$DEST/virtualhome/unpacked"
  unzip -q -n "$DEST/archives/virtualhome_master.zip" -d "$DEST/virtualhome/unpacked"
  for f in vh_seen_test.jsonl vh_unseen_test.jsonl; do
    cp "$(find "$DEST/virtualhome/unpacked" -name "$f" | head -1)" "$DEST/virtualhome/$f"
  done
  graphs=$(find "$DEST/virtualhome/unpacked" -type d -name init_and_final_graphs | head -1)
  [ -n "$graphs" ] && ln -sfn "$(cd "$graphs" && pwd)" "$DEST/virtualhome/init_and_final_graphs"
fi

status=0
check() {  # check <what> <found> <expected>
  if [ "$2" -ge "$3" ]; then echo "ok   $1: $2"; else echo "BAD  $1: $2 (expected $3)"; status=1; fi
}
check "alfworld train games" "$(count "$DEST/alfworld/json_2.1.1/train" game.tw-pddl)" 3553
check "alfworld valid_seen games" "$(count "$DEST/alfworld/json_2.1.1/valid_seen" game.tw-pddl)" 140
check "alfworld valid_unseen games" "$(count "$DEST/alfworld/json_2.1.1/valid_unseen" game.tw-pddl)" 134
check "virtualhome seen tasks" "$(wc -l < "$DEST/virtualhome/vh_seen_test.jsonl")" 247
check "virtualhome unseen tasks" "$(wc -l < "$DEST/virtualhome/vh_unseen_test.jsonl")" 247
echo "export ALFWORLD_DATA=$DEST/alfworld VH_DATA=$DEST/virtualhome"
exit $status
