"""A real object store wrapped to observe or interrupt calls (tests subclass it; nothing is faked)."""

from __future__ import annotations

from moderation.store import ObjectStore


class PassThrough(ObjectStore):
    """Every call goes to ``inner``; subclasses override the one they watch."""

    def __init__(self, inner: ObjectStore):
        self.inner = inner
        self.url = inner.url

    def put(self, key, data, content_type="application/octet-stream"):
        self.inner.put(key, data, content_type)

    def get(self, key):
        return self.inner.get(key)

    def exists(self, key):
        return self.inner.exists(key)

    def size(self, key):
        return self.inner.size(key)

    def list(self, prefix=""):
        return self.inner.list(prefix)

    def entries(self, prefix=""):
        return self.inner.entries(prefix)

    def delete(self, key):
        self.inner.delete(key)

    def locate(self, key, expires=None):
        return self.inner.locate(key)
