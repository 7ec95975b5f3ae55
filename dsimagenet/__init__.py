"""dsimagenet: downsampled ImageNet (Chrabaszcz, Loshchilov, Hutter, 2017), built, loaded and trained on.

The public API is re-exported here; each module's docstring says how to use it.
"""

__version__ = "0.1.0"

from dsimagenet.convert import convert, describe
from dsimagenet.dataset import ImageNetDS, detect_format, open_dataset
from dsimagenet.labels import IMAGENET, ClassSubset, ClassTable, subset, val_ground_truth, val_label

__all__ = ["IMAGENET", "ClassSubset", "ClassTable", "ImageNetDS", "convert", "describe", "detect_format",
           "open_dataset", "subset", "val_ground_truth", "val_label", "__version__"]
