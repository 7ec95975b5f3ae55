"""The versions of what made a file: dsimagenet, Python, numpy, Pillow (and its libjpeg), torch when asked.

A leaf module that the build (manifest.json) and runs (config.json) both import; it imports nothing of ours
but the package version, so the data side never calls up into runs to describe itself.
"""

from __future__ import annotations

import platform


def versions(with_torch: bool = True) -> dict:
    import numpy
    import PIL

    from dsimagenet import __version__

    out = {"dsimagenet": __version__, "python": platform.python_version(), "numpy": numpy.__version__,
           "pillow": PIL.__version__}
    if with_torch:  # importing torch takes seconds: the builder does without
        import torch

        out.update(torch=torch.__version__, cuda=torch.version.cuda)
    return out


def libjpeg_version() -> str | None:
    """The JPEG decoder Pillow was built with: it decides the decoded pixels, so a build records it."""
    from PIL import features

    v = features.version("jpg")
    return f"{v} (libjpeg-turbo)" if features.check_feature("libjpeg_turbo") else v
