"""evl-cache: train EVL video models on frozen CLIP features that are extracted once.

Stage one, `extract`, runs the frozen image tower over every video and writes a cache; stage two,
`train`, fits the EVL decoder (or another head) from that cache. Every CLI command is a function
here that takes a config dataclass of the same options:

    import evl_cache
    evl_cache.extract(evl_cache.ExtractConfig(videos="k400", out="feats.zarr"))
    evl_cache.train(evl_cache.TrainConfig(features="feats.zarr", out="runs/evl"))

The package reads as the pipeline: `video` (find, sample, decode) -> `towers` (the frozen CLIP
towers) -> `cache` (the store, extraction, the dataset over it) -> `decoder` (the EVL decoder, train,
evaluate) -> `tuning` (`finetune`: ViFi-CLIP's training of the towers themselves, on decoded clips)
-> `apps` (predict, explain, zero-shot, studies and their pages, the demo).
"""
from .apps.demo import DemoConfig, run_demo
from .apps.explain import ExplainConfig, ExplainSummary, explain
from .apps.predict import PredictConfig, Prediction, predict
from .apps.results import CompareConfig, RunRow, compare
from .apps.study import StudyConfig, run_study
from .apps.zeroshot import ZeroShotConfig, zeroshot
from .cache.dataset import CacheDataset, CacheLoader
from .cache.extract import ExtractSummary, extract
from .cache.info import InfoConfig, info
from .cache.options import ExtractConfig
from .cache.plan import CachePlan, plan
from .cache.store import FeatureStore
from .cache.verify import VerifyConfig, VerifyReport, verify
from .decoder.evaluate import EvalConfig, evaluate
from .decoder.evl_checkpoints import ExportConfig, ImportConfig, export_evl, import_evl
from .decoder.train import TrainConfig, TrainSummary, train
from .errors import EvlCacheError
from .runtime import __version__
from .towers.vificlip import VifiExportConfig, VifiImportConfig, export_vificlip, import_vificlip
from .tuning.finetune import FinetuneConfig, FinetuneSummary, finetune

__all__ = [
    "CacheDataset", "CacheLoader", "CachePlan", "CompareConfig", "DemoConfig", "EvalConfig", "EvlCacheError",
    "ExplainConfig", "ExplainSummary", "ExportConfig", "ExtractConfig", "ExtractSummary", "FeatureStore",
    "FinetuneConfig", "FinetuneSummary", "ImportConfig", "InfoConfig", "PredictConfig",
    "Prediction", "RunRow", "StudyConfig", "TrainConfig", "TrainSummary", "VerifyConfig", "VerifyReport",
    "VifiExportConfig", "VifiImportConfig", "ZeroShotConfig", "__version__", "compare", "evaluate", "explain",
    "export_evl", "export_vificlip", "extract", "finetune", "import_evl",
    "import_vificlip", "info", "plan", "predict", "run_demo", "run_study", "train", "verify", "zeroshot",
]
