"""evl-cache: train EVL video models on frozen CLIP features that are extracted once.

Stage one, `extract`, runs the frozen image tower over every video and writes a cache; stage two,
`train`, fits the EVL decoder (or another head) from that cache. Every CLI command is a function
here that takes a config dataclass of the same options:

    import evl_cache
    evl_cache.extract(evl_cache.ExtractConfig(videos="k400", out="feats.zarr"))
    evl_cache.train(evl_cache.TrainConfig(features="feats.zarr", out="runs/evl"))

The package reads as the pipeline: `video` (find, sample, decode) -> `towers` (the frozen CLIP
towers) -> `cache` (the store, extraction, the dataset over it) -> `decoder` (the EVL decoder, train,
evaluate) -> `apps` (predict, zero-shot, studies, the demo).
"""
from .apps.demo import DemoConfig, run_demo
from .apps.predict import PredictConfig, Prediction, predict
from .apps.results import RunRow, read_run
from .apps.study import Study, load_study, run_study
from .apps.zeroshot import ZeroShotConfig, zeroshot
from .cache.extract import ExtractConfig, ExtractSummary, extract
from .cache.info import cache_info
from .cache.plan import CachePlan, plan_cache
from .cache.store import FeatureStore
from .cache.verify import VerifyReport, verify
from .decoder.evaluate import EvalConfig, evaluate
from .decoder.evl_checkpoints import ImportConfig, export_evl, import_evl
from .decoder.train import TrainConfig, TrainSummary, train
from .errors import EvlCacheError
from .runtime import __version__
from .towers.vificlip import VifiImportConfig, import_vificlip

__all__ = [
    "CachePlan", "DemoConfig", "EvalConfig", "EvlCacheError", "ExtractConfig", "ExtractSummary", "FeatureStore",
    "ImportConfig", "PredictConfig", "Prediction", "RunRow", "Study", "TrainConfig", "TrainSummary",
    "VerifyReport", "VifiImportConfig", "ZeroShotConfig", "__version__", "cache_info", "evaluate", "export_evl",
    "extract", "import_evl", "import_vificlip", "load_study", "plan_cache", "predict", "read_run", "run_demo",
    "run_study", "train", "verify", "zeroshot",
]
