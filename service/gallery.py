"""The read side of a session's images: counts, paths, listings, files and metadata.

A mixin of :class:`~multigen.service.serviceThread.ServiceThread`: it needs ``self.store`` and
``self._session_row``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import NotFound
from .views import image_view


class ImageQueries:
    """metafusion's image calls (``get_image_count``, ``get_image_pathname``) and the API's."""

    store: Any  # and ``_session_row(session_id)``, both from ServiceThread

    def get_image_count(self, session_id: str) -> int:
        self._session_row(session_id)
        return self.store.image_count(session_id)

    def get_image_pathname(self, session_id: str, index: int) -> str:
        """Path of a session's image by index (metafusion). Raises NotFound."""
        self._session_row(session_id)
        img = self.store.image_by_index(session_id, int(index))
        if img is None:
            raise NotFound(f"session {session_id} has no image {index} "
                           f"({self.store.image_count(session_id)} written)", field="index")
        return img["path"]

    def list_images(self, session_id: str, after: int | None = None) -> list[dict[str, Any]]:
        """A session's images in index order, those after index ``after`` only when given."""
        self._session_row(session_id)
        return [image_view(r) for r in self.store.list_images(session_id=session_id, after=after)]

    def get_image(self, image_id: str) -> dict[str, Any]:
        return image_view(self._image_row(image_id))

    def image_file(self, image_id: str) -> Path:
        """The PNG file of an image (for the API's file endpoint)."""
        return Path(self._image_row(image_id)["path"])

    def image_metadata(self, image_id: str) -> dict[str, Any]:
        """The parameters that reproduce an image (its JSON sidecar)."""
        path = self.image_file(image_id).with_suffix(".json")
        return json.loads(path.read_text())

    def _image_row(self, image_id: str) -> dict[str, Any]:
        row = self.store.get_image(image_id)
        if row is None:
            raise NotFound(f"image {image_id} not found", field="image_id")
        return row

    def _image_view(self, row: dict[str, Any]) -> dict[str, Any]:
        return image_view(row)
