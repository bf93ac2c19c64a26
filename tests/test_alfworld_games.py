"""scripts/make_alfworld_games.py: the generated ALFWorld game set (layout, counts, determinism) and
alfworld's handcoded expert winning a sample of its games on the real engine."""
from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SPEC = importlib.util.spec_from_file_location("make_alfworld_games", REPO / "scripts" / "make_alfworld_games.py")
games = sys.modules[SPEC.name] = importlib.util.module_from_spec(SPEC)  # dataclasses look it up there
SPEC.loader.exec_module(games)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("alfworld")
    games.generate(out, seed=0)
    return out / "json_2.1.1"


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_counts_per_split_and_type(generated):
    for split, per_type in games.GAMES_PER_TYPE.items():
        trials = sorted((generated / split).glob("*/trial_T*"))
        assert all({p.name for p in t.iterdir()} == {"game.tw-pddl", "traj_data.json"} for t in trials)
        types = Counter(t.parent.name.split("-")[0] for t in trials)
        assert types == {task_type: per_type for task_type in games.TASK_TYPES}, split
        for trial in trials:
            traj = json.loads((trial / "traj_data.json").read_text())
            task_type, obj, mrecep, target, scene = trial.parent.name.split("-")
            params = traj["pddl_params"]
            assert (traj["task_type"], traj["task_id"], mrecep) == (task_type, trial.name, "None")
            assert params["object_target"] == obj and target in (params["parent_target"], params["toggle_target"])
            assert traj["scene"]["floor_plan"] == f"FloorPlan{scene}"
            game = json.loads((trial / "game.tw-pddl").read_text())
            assert list(game) == ["pddl_domain", "grammar", "pddl_problem", "solvable"] and game["solvable"]
            desc = traj["turk_annotations"]["anns"][0]["task_desc"]
            assert "UNKNOWN GOAL" not in game["grammar"] and desc[:-1].lower() in game["grammar"]


def test_unseen_rooms_never_in_train(generated):
    def scenes(split: str) -> set[str]:
        return {d.name.rsplit("-", 1)[1] for d in (generated / split).iterdir()}

    assert scenes("valid_seen") <= scenes("train")
    assert not scenes("valid_unseen") & scenes("train")


def test_same_seed_same_bytes_other_seed_other_games(generated, tmp_path):
    games.generate(tmp_path / "again", seed=0)
    assert tree_bytes(tmp_path / "again" / "json_2.1.1") == tree_bytes(generated)
    games.generate(tmp_path / "other", seed=1)
    assert tree_bytes(tmp_path / "other" / "json_2.1.1") != tree_bytes(generated)


def test_existing_output_is_kept(generated, tmp_path):
    games.generate(tmp_path, seed=0)
    with pytest.raises(FileExistsError):
        games.generate(tmp_path, seed=0)
    assert tree_bytes(tmp_path / "json_2.1.1") == tree_bytes(generated)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["json_2.1.1"]  # no staging folder left


@pytest.mark.parametrize("task_type", games.TASK_TYPES)
def test_handcoded_expert_wins_valid_unseen(generated, task_type):
    game_file = sorted((generated / "valid_unseen").glob(f"{task_type}-*/*/game.tw-pddl"))[0]
    won, steps = games.play_expert(game_file)
    assert won and steps <= games.MAX_EXPERT_STEPS, (game_file, steps)


def test_more_train_games_per_type(tmp_path):
    """--train_per_type: a larger train split for longer CPU runs; the test splits keep their sizes."""
    assert games.main(["--out", str(tmp_path), "--train_per_type", "6"]) == 0
    root = tmp_path / "json_2.1.1"
    types = Counter(t.parent.name.split("-")[0] for t in (root / "train").glob("*/trial_T*"))
    assert types == {task_type: 6 for task_type in games.TASK_TYPES}
    assert len(list((root / "valid_unseen").glob("*/trial_T*"))) == 2 * len(games.TASK_TYPES)
