"""dsimagenet: downsampled ImageNet (Chrabaszcz, Loshchilov, Hutter, 2017), built, loaded and trained on.

The public API is re-exported here; each module's docstring says how to use it. What needs torch (Loader,
WideResNet, TrainConfig, train, load_runs, runs_table) is imported on first use, so ``import dsimagenet`` stays light.
"""

__version__ = "0.1.0"

from dsimagenet.build import BuildConfig, build
from dsimagenet.convert import convert, describe
from dsimagenet.dataset import ImageNetDS, detect_format, open_dataset
from dsimagenet.labels import IMAGENET, ClassSubset, ClassTable, subset, val_ground_truth, val_label

_LAZY = {"Loader": "dsimagenet.data", "WideResNet": "dsimagenet.model", "TrainConfig": "dsimagenet.train",
         "train": "dsimagenet.train", "load_runs": "dsimagenet.runs", "evaluate": "dsimagenet.evaluation",
         "runs_table": "dsimagenet.runs"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        # importing dsimagenet.train sets this package's attribute "train" to that module, which would hide the
        # function of that name (``from dsimagenet import TrainConfig, train`` gave the module): bind every name
        # the module provides here, after the import
        globals().update({n: getattr(module, n) for n, m in _LAZY.items() if m == _LAZY[name]})
        return globals()[name]
    raise AttributeError(f"module 'dsimagenet' has no attribute {name!r}")


__all__ = ["IMAGENET", "BuildConfig", "ClassSubset", "ClassTable", "ImageNetDS", "Loader", "TrainConfig",
           "WideResNet", "build", "convert", "describe", "detect_format", "evaluate", "load_runs", "open_dataset",
           "runs_table", "subset", "train", "val_ground_truth", "val_label", "__version__"]
