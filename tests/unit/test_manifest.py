"""Reading valid manifests: values, ids, paths, line numbers and storage round trips."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from batch_runner import manifest
from batch_runner.errors import ManifestError
from batch_runner.manifest import JobSpec, RowProblems, read_manifest, validate_manifest

VALID = Path(__file__).parent.parent / "manifests" / "valid"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    Image.new("RGB", (32, 24), "blue").save(tmp_path / "img" / "a.png")
    Image.new("RGB", (24, 32), "red").save(tmp_path / "img" / "b.png")
    return tmp_path


def _specs(path: Path, **kwargs: bool) -> list[JobSpec]:
    items = list(read_manifest(path, **kwargs))
    bad = [str(p) for i in items if isinstance(i, RowProblems) for p in i.problems]
    assert bad == []
    return [i for i in items if isinstance(i, JobSpec)]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_values_are_typed_and_node_columns_kept_as_text() -> None:
    full, minimal, preset = _specs(VALID / "good.csv")

    assert full.job_id == "full"
    assert full.line == 2
    assert full.image == (VALID.parent / "images" / "ok.png").absolute()
    assert full.prompt == "a prompt with a comma, and\na second line"
    assert full.negative_prompt == "blurry"
    assert full.seed == 2**64 - 1
    assert (full.width, full.height, full.frames, full.steps, full.switch_step) == (
        832,
        480,
        33,
        40,
        15,
    )
    assert (full.fps, full.cfg, full.shift) == (24.0, 5.0, 5.0)
    assert isinstance(full.fps, float)
    assert full.output == "full-clip"
    assert full.node_inputs == (("57", "sampler_name", "dpmpp_2m"), ("My Sampler", "cfg", "4.5"))
    # The quoted prompt spans lines 2-3, so the next record starts on line 4.
    assert minimal.line == 4
    assert minimal.seed is None and minimal.node_inputs == () and minimal.output is None
    assert (preset.line, preset.preset, preset.frames) == (5, "480p", 17)


def test_jsonl_keeps_json_types_and_treats_null_and_empty_as_unset() -> None:
    full, minimal = _specs(VALID / "good.jsonl")

    assert full.node_inputs == (
        ("57", "sampler_name", "dpmpp_2m"),
        ("63", "batch_size", 1),
        ("x", "flag", True),
    )
    assert (full.seed, full.fps, full.cfg) == (0, 24.0, 5.0)
    assert isinstance(full.cfg, float)
    assert minimal.line == 3
    assert minimal.prompt == "just a prompt"
    assert minimal.seed is None and minimal.negative_prompt is None


def test_bom_and_crlf_are_accepted() -> None:
    (spec,) = _specs(VALID / "bom_crlf.csv")
    assert spec.job_id == "bom-1"
    assert spec.prompt == 'a BOM, CRLF line ends and a "quoted" word'
    assert spec.seed == 3


def test_header_names_are_trimmed_and_blank_rows_skipped(folder: Path) -> None:
    path = _write(folder / "m.csv", " id , image ,prompt\n\na,img/a.png,x\n,,\n\nb,img/b.png,y\n")
    assert [(s.job_id, s.line) for s in _specs(path)] == [("a", 3), ("b", 6)]


def test_relative_images_resolve_against_the_manifest_folder(
    folder: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    absolute = folder / "img" / "b.png"
    path = _write(folder / "m.csv", f"id,image,prompt\na,img/../img/a.png,x\nb,{absolute},y\n")
    a, b = _specs(path)
    assert a.image == folder / "img" / "a.png"
    assert a.image.is_absolute()
    assert b.image == absolute


def test_derived_ids_depend_on_content_not_position(folder: Path) -> None:
    rows = ["img/a.png,walk,1", "img/b.png,run,", "./img/a.png,jump,"]
    first = _specs(_write(folder / "one.csv", "image,prompt,seed\n" + "\n".join(rows) + "\n"))
    reordered = rows[::-1]
    second = _specs(_write(folder / "two.csv", "image,prompt,seed\n" + "\n".join(reordered) + "\n"))

    by_prompt = {s.prompt: s.job_id for s in first}
    assert {s.prompt: s.job_id for s in second} == by_prompt
    assert len(set(by_prompt.values())) == 3
    assert all(len(i) == 16 for i in by_prompt.values())
    changed = _specs(_write(folder / "three.csv", "image,prompt,seed\nimg/a.png,walk,2\n"))
    assert changed[0].job_id != by_prompt["walk"]


def test_derived_ids_survive_moving_the_folder(folder: Path, tmp_path: Path) -> None:
    _write(folder / "m.csv", "image,prompt\nimg/a.png,walk\n")
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    shutil.copytree(folder, moved)
    assert _specs(folder / "m.csv")[0].job_id == _specs(moved / "m.csv")[0].job_id


def test_file_level_problems_raise_before_iteration(folder: Path) -> None:
    path = _write(folder / "m.csv", "id,image,prompt,colour\na,img/a.png,x,red\n")
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    assert "unknown column 'colour'" in str(caught.value)
    assert validate_manifest(path)[0] == 0


def test_missing_manifest_is_a_manifest_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="file not found"):
        read_manifest(tmp_path / "absent.csv")


def test_check_images_off_skips_opening_images(folder: Path) -> None:
    path = _write(folder / "m.csv", "id,image,prompt\na,img/none.png,x\n")
    (spec,) = _specs(path, check_images=False)
    assert spec.image == folder / "img" / "none.png"
    assert validate_manifest(path)[0] == 0


def test_each_distinct_image_is_verified_once(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: list[Path] = []
    real = manifest._image_problem

    def counting(path: Path) -> str | None:
        checked.append(path)
        return real(path)

    monkeypatch.setattr(manifest, "_image_problem", counting)
    rows = "".join(f"j{i},img/{'ab'[i % 2]}.png,p{i}\n" for i in range(50))
    assert len(_specs(_write(folder / "m.csv", "id,image,prompt\n" + rows))) == 50
    assert sorted(checked) == [folder / "img" / "a.png", folder / "img" / "b.png"]


def test_spec_round_trips_through_json(folder: Path) -> None:
    full = _specs(VALID / "good.csv")[0]
    data = json.loads(json.dumps(full.to_json()))
    again = JobSpec.from_json(data)
    assert again == full
    assert again.content_hash() == full.content_hash()


def test_content_hash_ignores_line_and_follows_content(folder: Path) -> None:
    spec = JobSpec("a", 2, folder / "img" / "a.png", "walk", seed=3)
    moved = JobSpec("a", 9, folder / "img" / "a.png", "walk", seed=3)
    assert spec.content_hash() == moved.content_hash()
    for other in (
        JobSpec("a", 2, folder / "img" / "a.png", "walk", seed=4),
        JobSpec("a", 2, folder / "img" / "a.png", "run", seed=3),
        JobSpec("a", 2, folder / "img" / "a.png", "walk", seed=3, node_inputs=(("6", "t", "x"),)),
        JobSpec("b", 2, folder / "img" / "a.png", "walk", seed=3),
    ):
        assert other.content_hash() != spec.content_hash()


def test_example_batch_is_valid() -> None:
    root = Path(__file__).parent.parent.parent
    good, problems = validate_manifest(root / "jobs.example.csv")
    assert (good, problems) == (5, [])
    specs = _specs(root / "jobs.example.csv")
    assert any(s.seed is not None for s in specs)
    assert any(s.preset == "480p" for s in specs)
    assert any(s.frames == 33 for s in specs)
    assert all(s.image.parent == root / "examples" for s in specs)


def test_seen_table_finds_every_duplicate_across_growth() -> None:
    table = manifest._SeenTable()
    assert all(table.add(f"k{i}", i + 1) is None for i in range(5000))
    assert table.add("k0", 99) == 1
    assert table.add("k4999", 99) == 5000
    assert table.add("other", 7) is None


@pytest.mark.slow
def test_a_million_rows_stream_through(tmp_path: Path) -> None:
    # How fast is for bench/p4_ingest.py to say; here, that every row comes out.
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path = tmp_path / "big.csv"
    with path.open("w") as handle:
        handle.write("id,image,prompt,seed\n")
        handle.writelines(f"j{i},a.png,prompt number {i},{i}\n" for i in range(1_000_000))
    seeds = [item.seed for item in read_manifest(path) if isinstance(item, JobSpec)]
    assert len(seeds) == 1_000_000 and seeds[-1] == 999_999


def test_overlong_lines_are_reported_and_skipped(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manifest, "MAX_LINE_CHARS", 64)
    csv_path = _write(
        folder / "m.csv", f"id,image,prompt\na,img/a.png,{'x' * 200}\nb,img/a.png,ok\n"
    )
    items = list(read_manifest(csv_path))
    assert isinstance(items[0], RowProblems)
    assert "line is longer than 64 characters" in items[0].problems[0].reason
    assert items[0].problems[0].line == 2
    assert isinstance(items[-1], JobSpec) and items[-1].job_id == "b"

    jsonl_path = _write(
        folder / "m.jsonl",
        json.dumps({"id": "a", "image": "img/a.png", "prompt": "x" * 200})
        + "\n"
        + json.dumps({"id": "b", "image": "img/a.png", "prompt": "ok"})
        + "\n",
    )
    first, second = read_manifest(jsonl_path)
    assert isinstance(first, RowProblems) and first.line == 1
    assert isinstance(second, JobSpec) and (second.job_id, second.line) == ("b", 2)


def _reference_hash(spec: JobSpec) -> str:
    """The content hash as first defined: canonical JSON of to_json() without the line."""
    data = spec.to_json()
    del data["line"]
    text = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _reference_text(spec: JobSpec) -> str:
    """The stored spec as first written: the line, then the set fields in sorted order."""
    data = spec.to_json()
    line = data.pop("line")
    if not data["node_inputs"]:
        del data["node_inputs"]
    kept = {key: data[key] for key in sorted(data) if data[key] is not None}
    return json.dumps({"line": line, **kept}, ensure_ascii=False, separators=(",", ":"))


def test_a_draft_encodes_as_its_spec(folder: Path) -> None:
    path = _write(
        folder / "m.csv",
        "id,image,prompt,seed,fps,node.6.text,workflow,negative_prompt\n"
        "a,img/a.png,walk,7,16,,,\n"
        'b,img/b.png,"run, ""fast""",,12.5,hello,wan22-fast4,ünï\n'
        ",img/a.png,sit,,,,,\n",
    )
    reader, columns = manifest.open_manifest(path)
    assert columns is not None
    with path.open(encoding="utf-8", newline="") as handle:
        drafts = list(reader.csv_drafts(columns, handle, 0))
    assert len(drafts) == 3
    for draft in drafts:
        spec = draft.spec
        assert spec is not None and spec.line == draft.line and spec.job_id == draft.job_id
        assert draft.encoded() == spec.encoded()


def test_hashed_fields_are_to_json_keys_in_sorted_order(folder: Path) -> None:
    keys = set(JobSpec("a", 2, folder / "a.png", "walk", workflow="w").to_json())
    assert list(manifest._HASHED_FIELDS) == sorted(keys - {"line", "workflow"})


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"seed": 2**64 - 1, "preset": "720p", "frames": 81, "steps": 4, "switch_step": 2},
        {"fps": 16.0, "cfg": 3.5, "shift": 1e-7, "width": 832, "height": 480},
        {"negative_prompt": 'ünïcødé "quoted"\\ \n\t\x01 ✓ 🎬', "output": "clip-1.v2"},
        {"node_inputs": (("6", "text", "x"), ("KSampler (high)", "seed", 7), ("n", "b", True))},
        {"workflow": "wan22-fast4", "node_inputs": (("n", "f", 0.1),)},
        {"workflow": "flows/über.json"},
        {"negative_prompt": "null", "output": "[]"},
    ],
)
def test_encoded_spec_reads_back_and_hashes_as_canonical_json(
    folder: Path, changes: dict[str, Any]
) -> None:
    spec = JobSpec("job-1", 7, folder / "img" / "a b.png", "a 'prompt', with \"quotes\"", **changes)
    text, digest = spec.encoded()
    assert digest == _reference_hash(spec) == spec.content_hash()
    assert text == _reference_text(spec)
    assert JobSpec.from_json(json.loads(text)) == spec
    assert None not in json.loads(text).values(), "unset fields are left out of the stored spec"
