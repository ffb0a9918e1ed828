"""Which object store a process keeps job files in: ``open_object_store`` reads the settings
(``MODELPRESS_STORAGE_URL``) and opens the data directory's (``objectstore.LocalObjects``) or a
bucket's (``s3_objects.S3Objects``).
"""

from __future__ import annotations

from modelpress.config import Settings
from modelpress.objectstore import LocalObjects, ObjectStore
from modelpress.s3_objects import S3Objects
from modelpress.storage import Storage


def open_object_store(settings: Settings, storage: Storage | None = None) -> ObjectStore:
    """The store ``MODELPRESS_STORAGE_URL`` names: unset, the data directory."""
    storage = storage or Storage(settings.data_dir)
    if not settings.storage_url:
        return LocalObjects(storage)
    return S3Objects(storage, settings)
