"""A mail job queue on PostgreSQL.

For applications: mailqueue.enqueue and mailqueue.enqueue_many (mail in from
Python, docs/python.md); mailqueue.django.EmailBackend for Django. The rest is
the code consumer.py, producer.py and `python -m mailqueue` share.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mailqueue.enqueuing import enqueue, enqueue_many

__all__ = ["enqueue", "enqueue_many"]


def __getattr__(name: str) -> Any:
    # Imported on first use: the scripts import this package before they can
    # check, in one line, that the requirements are installed (mailqueue/runtime.py).
    if name in __all__:
        from mailqueue import enqueuing

        return getattr(enqueuing, name)
    raise AttributeError("module 'mailqueue' has no attribute %r" % name)
