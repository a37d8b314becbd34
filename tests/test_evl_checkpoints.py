"""The authors' checkpoint format: import, export, round trip, and clear refusals."""
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from evl_cache.cli import main
from evl_cache.decoder.evl_checkpoints import ExportConfig, ImportConfig, export_evl, import_evl
from evl_cache.decoder.model import DecoderConfig, EVLModel
from evl_cache.errors import CheckpointError


def authors_checkpoint(path, layers=2, frames=4, classes=3, cross_attention=True, seed=0):
    """A checkpoint in the authors' layout for EVL-Tiny (width 64, grid 4x4), every weight random."""
    torch.manual_seed(seed)
    model = EVLModel(DecoderConfig(width=64, grid=(4, 4), frames=frames, num_classes=classes, layers=layers,
                                   heads=2, temporal_cross_attention=cross_attention))
    state = {f"module.{k}": torch.randn_like(v) * 0.1 for k, v in model.state_dict().items()}
    torch.save({"model": state, "epoch": 12}, path)
    return state


@pytest.fixture
def classes_file(tmp_path):
    path = tmp_path / "classes.json"
    path.write_text(json.dumps({"walk": 0, "run": 1, "jump": 2}))
    return path


def test_import_reads_the_decoder_shape_and_export_round_trips(tmp_path, classes_file):
    state = authors_checkpoint(tmp_path / "evl.pth")
    run = import_evl(ImportConfig(checkpoint=tmp_path / "evl.pth", out=tmp_path / "run", model="EVL-Tiny",
                                  pretrained="none", classes=classes_file, stride=3))
    config = json.loads((run / "config.json").read_text())
    assert config["decoder"]["layers"] == 2 and config["decoder"]["frames"] == 4
    assert config["decoder"]["num_classes"] == 3 and config["decoder"]["temporal_cross_attention"]
    assert config["cache"]["class_names"] == ["walk", "run", "jump"]
    assert config["cache"]["sampling"]["stride"] == 3 and config["selection"]["blocks"] == [2, 3]
    weights = load_file(run / "best.safetensors")
    for key, value in state.items():
        assert torch.equal(weights[key[len("module."):]], value)
    export_evl(ExportConfig(run, tmp_path / "back.pth"))
    back = torch.load(tmp_path / "back.pth", weights_only=True)["model"]
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_ablated_checkpoint_imports_as_the_ablation(tmp_path):
    authors_checkpoint(tmp_path / "evl.pth", cross_attention=False)
    run = import_evl(ImportConfig(checkpoint=tmp_path / "evl.pth", out=tmp_path / "run", model="EVL-Tiny",
                                  pretrained="none"))
    config = json.loads((run / "config.json").read_text())
    assert not config["decoder"]["temporal_cross_attention"] and config["cache"]["class_names"] == ["0", "1", "2"]


def test_bad_checkpoints_are_refused(tmp_path, classes_file):
    state = authors_checkpoint(tmp_path / "good.pth")
    options = dict(model="EVL-Tiny", pretrained="none")

    def attempt(name, payload=None, **extra):
        path = tmp_path / name
        if payload is not None:
            torch.save(payload, path)
        return import_evl(ImportConfig(checkpoint=path, out=tmp_path / f"run_{name}", **options, **extra))

    with pytest.raises(CheckpointError, match="unexpected keys .*module.backbone|unexpected keys .*backbone"):
        attempt("extra.pth", {"model": {**state, "module.backbone.conv1.weight": torch.zeros(1)}})
    broken = dict(state)
    broken["module.decoder.decoder_layers.0.mlp.fc2.weight"] = torch.zeros(7, 7)
    with pytest.raises(CheckpointError, match="fc2.weight has shape \\(7, 7\\)"):
        attempt("shape.pth", {"model": broken})
    missing = {k: v for k, v in state.items() if "norm2" not in k}
    with pytest.raises(CheckpointError, match="keys do not match the decoder: missing"):
        attempt("missing.pth", {"model": missing})
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read as a torch checkpoint"):
        attempt("text.pth")
    with pytest.raises(CheckpointError, match="the checkpoint is for 4 frames, --frames says 8"):
        attempt("good.pth", frames=8)
    other_grid = dict(state)
    other_grid["module.decoder.cross_attention.0.w1"] = torch.zeros(9, 64)
    with pytest.raises(CheckpointError, match="another patch grid"):
        attempt("grid.pth", {"model": other_grid})
    names = tmp_path / "two.txt"
    names.write_text("a\nb\n")
    with pytest.raises(CheckpointError, match="the head has 3 classes"):
        attempt("good.pth", classes=names)


def test_cli_import_and_export(tmp_path, classes_file):
    authors_checkpoint(tmp_path / "evl.pth")
    runner = CliRunner()
    result = runner.invoke(main, ["import-evl", str(tmp_path / "evl.pth"), "--model", "EVL-Tiny", "--pretrained",
                                  "none", "--classes", str(classes_file), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["export-evl", str(tmp_path / "run"), "--out", str(tmp_path / "x.pth")])
    assert result.exit_code == 0 and (tmp_path / "x.pth").exists()
    result = runner.invoke(main, ["import-evl", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "r2")])
    assert result.exit_code == 1 and "nope.pth: checkpoint not found" in result.output


def test_objects_of_the_training_code_beside_the_weights_are_read_inertly(tmp_path, classes_file):
    """A checkpoint that also pickles, say, the training script's argparse options still imports: classes
    torch does not allow are read as plain dicts, and nothing in the file is called."""
    import argparse
    state = authors_checkpoint(tmp_path / "plain.pth")
    torch.save({"model": state, "args": argparse.Namespace(lr=4e-4, arch="ViT-B/16")}, tmp_path / "evl.pth")
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(tmp_path / "evl.pth", weights_only=True)
    run = import_evl(ImportConfig(checkpoint=tmp_path / "evl.pth", out=tmp_path / "run", model="EVL-Tiny",
                                  pretrained="none", classes=classes_file))
    weights = load_file(run / "best.safetensors")
    assert all(torch.equal(weights[k[len("module."):]], v) for k, v in state.items())
