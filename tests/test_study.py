"""Study recipes: one cache, many runs, a results table that matches the runs' own files; the sample
recipe is the demo's."""
import functools
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_pages import check_offline_page

from evl_cache.apps import demo
from evl_cache.apps import study as study_module
from evl_cache.apps.results import read_run
from evl_cache.apps.study import StudyConfig, load_study, run_study
from evl_cache.cli import main
from evl_cache.errors import EvlCacheError

RECIPE = """
[study]
out = "{out}"
sample_videos = true

[extract]
videos = "{out}/videos"
out = "{out}/feats.zarr"
model = "EVL-Tiny"
pretrained = "none"
frames = 4
stride = 3
eval_views = 2
blocks = 2
workers = 0

[train]
epochs = 2
batch_size = 16
heads = 2
workers = 0

[runs.full]
layers = 2

[runs.one_layer]
layers = 1

[runs.too_deep]
layers = 3

[runs.no_tca]
layers = 2
temporal_cross_attention = false
"""


PIPELINES = Path(__file__).parent.parent / "pipelines"


@pytest.fixture
def recipe(tmp_path, monkeypatch):
    """A tiny recipe; the sample videos it makes are few and small (conftest's sample_videos)."""
    path = tmp_path / "tiny.toml"
    path.write_text(RECIPE.format(out=tmp_path / "study"))
    tiny_sample = functools.partial(study_module.make_sample_dataset, videos_per_class={"train": 3, "val": 2},
                                    num_frames=24, size=(40, 52))
    monkeypatch.setattr(study_module, "make_sample_dataset", tiny_sample)
    return path


def test_study_runs_resumes_and_reports(recipe, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["run", str(recipe), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "sample videos will be made" in result.stdout and "run full: will train" in result.stdout
    rows = run_study(StudyConfig(recipe, only=["full"]))  # a partly finished study
    assert [r.status for r in rows] == ["finished", "missing", "missing", "missing"]
    dry = runner.invoke(main, ["run", str(recipe), "--dry-run"]).stdout
    assert "feats.zarr complete" in dry and "GB of features" in dry
    assert "run full: finished: will skip" in dry and "run one_layer: will train" in dry
    mtime = (tmp_path / "study" / "runs" / "full" / "last.safetensors").stat().st_mtime
    result = runner.invoke(main, ["run", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "3 runs ok, 1 failed" in result.stdout
    assert (tmp_path / "study" / "runs" / "full" / "last.safetensors").stat().st_mtime == mtime  # skipped
    study = tmp_path / "study"
    table = (study / "results.md").read_text()
    assert "too_deep" in table and "failed: " in table and "--layers 3 needs 3 cached blocks" in table
    assert (study / "results.png").exists()
    images, _, text = check_offline_page(study / "results.html")
    assert len(images) == 2 + 3 * 2  # top-1 per run, all curves; each finished run's curves and confusion
    assert "--layers 3 needs 3 cached blocks" in text
    csv_rows = (study / "results.csv").read_text().splitlines()
    header = csv_rows[0].split(",")
    assert header[:3] == ["run", "layers", "temporal_cross_attention"]
    for line in csv_rows[1:]:
        cells = dict(zip(header, line.split(",")))
        if cells["run"] == "too_deep":
            continue
        summary = [json.loads(x) for x in (study / "runs" / cells["run"] / "metrics.jsonl").read_text().splitlines()][-1]
        assert float(cells["top1"]) == pytest.approx(summary["val_top1"], abs=5e-5)
        assert float(cells["top5"]) == pytest.approx(summary["val_top5"], abs=5e-5)
    compare = runner.invoke(main, ["compare", str(study / "runs" / "full"), str(study / "runs" / "one_layer")])
    assert compare.exit_code == 0 and "| run | layers | top1 |" in compare.stdout
    assert f"{read_run(study / 'runs' / 'one_layer').top1:.4f}" in compare.stdout


TOWERS_RECIPE = """
[study]
out = "{out}"
sample_videos = true

[extract.siglip2]
videos = "{out}/videos"
out = "{out}/siglip2.zarr"
model = "EVL-Tiny-SL2"
pretrained = "none"
frames = 4
stride = 3
eval_views = 2
blocks = 1
workers = 0

[extract.pe]
videos = "{out}/videos"
out = "{out}/pe.zarr"
model = "EVL-Tiny-PE"
pretrained = "none"
frames = 4
stride = 3
eval_views = 1
blocks = 1
workers = 0

[train]
epochs = 1
batch_size = 16
layers = 1
workers = 0

[runs.siglip2_evl]
cache = "siglip2"

[runs.siglip2_probe]
cache = "siglip2"
head = "attentive-probe"

[runs.pe_linear_probe]
cache = "pe"
head = "linear-probe"
"""


def test_a_study_compares_towers_and_heads(tmp_path):
    """Caches of two tower families and runs of three heads in one study: the table names each run's tower
    and head."""
    recipe = tmp_path / "towers.toml"
    recipe.write_text(TOWERS_RECIPE.format(out=tmp_path / "study"))
    rows = run_study(StudyConfig(recipe))
    assert [r.status for r in rows] == ["finished"] * 3
    header = (tmp_path / "study" / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["run", "backbone", "head"]
    table = (tmp_path / "study" / "results.md").read_text()
    assert '"EVL-Tiny-SL2 (none)" | "attentive-probe"' in table and '"EVL-Tiny-PE (none)" | "linear-probe"' in table


def test_recipe_errors_name_the_table(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[extract]\nout = "x.zarr"\n[runs.a]\nlayrs = 2\n')
    with pytest.raises(EvlCacheError, match=r"\[runs.a\]: unknown option\(s\) layrs"):
        load_study(path)
    path.write_text('[extract]\nout = "x.zarr"\n[trian]\n')
    with pytest.raises(EvlCacheError, match="unknown table"):
        load_study(path)


def test_shipped_recipes_parse():
    recipes = sorted(PIPELINES.glob("*.toml"))
    assert {p.stem for p in recipes} >= {"sample", "k400_vitb16_8f", "k400_ablations", "ucf101_hmdb51", "ssv2",
                                        "backbones", "k400_backbones"}
    for path in recipes:
        study = load_study(path)
        assert study.runs, path


def test_sample_recipe_is_the_demos_data_and_recipe():
    study = load_study(PIPELINES / "sample.toml")
    extract = study.caches[""]
    assert study.sample_videos and (extract.model, extract.pretrained) == (demo.DemoConfig().model, "none")
    assert {key: getattr(extract, key) for key in demo.SAMPLING} == demo.SAMPLING
    assert list(study.runs) == ["evl", "layers_2", "no_cross_attention", "no_temporal"]
    for name, ablation in demo.ABLATIONS.items():
        run = study.runs[name]
        assert {key: getattr(run, key) for key in demo.RECIPE} == demo.RECIPE
        assert {m: getattr(run, m) for m in demo.TEMPORAL_MODULES} == {m: ablation.get(m, True)
                                                                       for m in demo.TEMPORAL_MODULES}
        assert (run.epochs, run.seed) == (demo.DemoConfig().epochs, 0)
