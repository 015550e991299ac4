"""``ImageList``: what ``gen`` returns, a list of images that stands for its only image.

``gen`` returns one image per seed, as a list. metafusion's ``gen`` returned the image
itself, and its programs call ``pipe.gen({...}).save("x.png")``; an ``ImageList`` of one image
forwards such attribute access (``save``, ``size``, ``convert``, ...) to that image, so both
kinds of program run. Attributes that a list has itself (``copy``, ``index``, ``count``) stay
the list's.
"""
from __future__ import annotations

from typing import Any

import numpy as np


class ImageList(list):
    """A list of PIL images; with exactly one image it also behaves as that image.

    Raises:
        AttributeError: an image attribute asked of a list holding none or several images
            (the message says to index it or loop over it).
    """

    def __getattr__(self, name: str) -> Any:
        # only called for names a list lacks; the copy/pickle protocols look up dunders here
        if name.startswith("__"):
            raise AttributeError(name)
        if len(self) == 1:
            return getattr(self[0], name)
        raise AttributeError(f"{name!r}: this gen result holds {len(self)} images, not one; take one with "
                             f"result[i] or loop over it")

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """``numpy.asarray(result)``: the only image's ``[H, W, C]`` array (several: stacked)."""
        arrays = [np.asarray(im) for im in self]
        out = arrays[0] if len(arrays) == 1 else np.stack(arrays)
        return out.astype(dtype) if dtype is not None else out
