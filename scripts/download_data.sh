#!/usr/bin/env bash
# Official data into the layout the stages expect, verified by counts:
#   data/official/alfworld/json_2.1.1/{train,valid_seen,valid_unseen}  (3,553 / 140 / 134 solvable games)
#   data/official/virtualhome/{vh_seen_test.jsonl,vh_unseen_test.jsonl}  (247 / 247 tasks)
#   data/official/virtualhome/init_and_final_graphs/                     (scene graphs)
#   data/official/virtualhome/new_train_conversation.jsonl (+ new_train_sft.json)  the paper's training tasks and
#                      their expert conversations (4,920), when the archives hold them; else the VirtualHome run
#                      trains on the generated scene-1 tasks, which the check below says
# and beside each family's data the published inputs the paper preset uses (eval_agent/published.py):
#   <family>_sft.json  the expert SFT data, when the archives hold it (alfworld_sft.json: IPR/ETO's)
#   <family>_inst.txt, <family>_icl.json   the original instruction and one-shot example, from the STeCa
#                      repository at a pinned commit, checked by sha256
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
# The original instruction and in-context example files: STeCa's repository at this commit.
STECA_RAW=${STECA_RAW:-https://raw.githubusercontent.com/WangHanLinHenry/STeCa/76f6ea7131e90e4fad3603396cced9586dea2ec3}
PROMPT_FILES=(  # <path in the repository> <family> <sha256>
  "eval_agent/prompt/instructions/alfworld_inst.txt alfworld 1315010838ff752b1d8b715534f61bf41eae2d2d9f419072ca6913dd92cab1d5"
  "eval_agent/prompt/icl_examples/alfworld_icl.json alfworld e4fd175ebb24016540dab0b6780937cdbbd0b04ba241eb7137837ad422fbdd0c"
  "eval_agent/prompt/instructions/virtualhome_inst.txt virtualhome eb135779347397e85c39bb762189f8920783ee638dc3204fe9d11304aeb79e23"
  "eval_agent/prompt/icl_examples/virtualhome_icl.json virtualhome 9d5b2f76318e3e1017a56ef0e643c16d1e6400dd0361c90e90742eff9d905c11"
)

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

# The published expert SFT files and VirtualHome training tasks, wherever the archives put them.
for pair in "alfworld_sft.json alfworld" "virtualhome_sft.json virtualhome" "vh_sft.json virtualhome" \
            "new_train_sft.json virtualhome" "new_train_conversation.jsonl virtualhome"; do
  read -r name family <<< "$pair"
  [ -d "$DEST/$family" ] && [ ! -f "$DEST/$family/$name" ] || continue
  found=$(find "$DEST/alfworld" "$DEST/virtualhome/unpacked" -name "$name" -not -path "*/json_2.1.1/*" 2> /dev/null | head -1)
  [ -n "$found" ] && cp "$found" "$DEST/$family/$name" && echo "published $name -> $DEST/$family/$name"
done

raw() {  # raw <repository path> <out> <sha256>: fetch, check, then move into place
  local url="$STECA_RAW/$1" out=$2 sum=$3
  [ -s "$out" ] && return 0
  if ! "$PY" -c "import sys, urllib.request as u; open(sys.argv[2], 'wb').write(u.urlopen(sys.argv[1], timeout=60).read())" \
      "$url" "$out.part"; then
    echo "download of $url failed: fetch it by hand into $out and rerun" >&2
    exit 1
  fi
  if [ "$(sha256sum "$out.part" | cut -d' ' -f1)" != "$sum" ]; then
    echo "$url: sha256 differs from the pinned one ($sum): not used" >&2
    exit 1
  fi
  mv "$out.part" "$out"
}
for entry in "${PROMPT_FILES[@]}"; do
  read -r path family sum <<< "$entry"
  mkdir -p "$DEST/$family"
  raw "$path" "$DEST/$family/$(basename "$path")" "$sum"
done

status=0
check() {  # check <what> <found> <expected>
  if [ "$2" -ge "$3" ]; then echo "ok   $1: $2"; else echo "BAD  $1: $2 (expected $3)"; status=1; fi
}
check "alfworld train games" "$(count "$DEST/alfworld/json_2.1.1/train" game.tw-pddl)" 3553
check "alfworld valid_seen games" "$(count "$DEST/alfworld/json_2.1.1/valid_seen" game.tw-pddl)" 140
check "alfworld valid_unseen games" "$(count "$DEST/alfworld/json_2.1.1/valid_unseen" game.tw-pddl)" 134
check "virtualhome seen tasks" "$(wc -l < "$DEST/virtualhome/vh_seen_test.jsonl")" 247
check "virtualhome unseen tasks" "$(wc -l < "$DEST/virtualhome/vh_unseen_test.jsonl")" 247
for family in alfworld virtualhome; do
  for name in "${family}_inst.txt" "${family}_icl.json" "${family}_sft.json"; do
    if [ -f "$DEST/$family/$name" ]; then echo "ok   $family/$name"; else echo "--   $family/$name: not found (the paper preset then uses ours)"; fi
  done
done
# the VirtualHome training data the stages will use, every row parsed and counted (eval_agent/published.py)
"$PY" -m eval_agent.published --task_family virtualhome --data_root "$DEST/virtualhome" --check_training || status=1
echo "export ALFWORLD_DATA=$DEST/alfworld VH_DATA=$DEST/virtualhome"
exit $status
