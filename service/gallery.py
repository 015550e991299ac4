"""The read side of a session's images: counts, paths, listings, files and metadata."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import NotFound
from .records import ImageRecord, SessionRecord
from .store import Store
from .views import image_view


class Gallery:
    """A session's images, read from the store (metafusion's image calls and the API's).

    Args:
        store: the service's store.
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    def session(self, session_id: str) -> SessionRecord:
        """The session's record. Raises NotFound."""
        record = self.store.get_session(session_id)
        if record is None:
            raise NotFound(f"session {session_id} not found", field="session_id")
        return record

    def image_count(self, session_id: str) -> dict[str, Any]:
        """metafusion's answer: ``{"image_number": n, "comment": ...}``, with ``session_id`` beside it."""
        self.session(session_id)
        n = self.store.image_count(session_id)
        return {"image_number": n, "comment": f"already generated number of images in session {session_id}",
                "session_id": session_id}

    def pathname(self, session_id: str, index: int) -> str:
        """Path of a session's image by index (metafusion). Raises NotFound."""
        self.session(session_id)
        img = self.store.image_by_index(session_id, int(index))
        if img is None:
            raise NotFound(f"session {session_id} has no image {index} "
                           f"({self.store.image_count(session_id)} written)", field="index")
        return img.path

    def list(self, session_id: str, after: int | None = None) -> list[dict[str, Any]]:
        """A session's images in index order, those after index ``after`` only when given."""
        self.session(session_id)
        return [image_view(r) for r in self.store.list_images(session_id=session_id, after=after)]

    def image(self, image_id: str) -> dict[str, Any]:
        return image_view(self.record(image_id))

    def file(self, image_id: str) -> Path:
        """The PNG file of an image (for the API's file endpoint)."""
        return Path(self.record(image_id).path)

    def metadata(self, image_id: str) -> dict[str, Any]:
        """The parameters that reproduce an image (its JSON sidecar)."""
        return json.loads(self.file(image_id).with_suffix(".json").read_text())

    def record(self, image_id: str) -> ImageRecord:
        """The image's record. Raises NotFound."""
        record = self.store.get_image(image_id)
        if record is None:
            raise NotFound(f"image {image_id} not found", field="image_id")
        return record
