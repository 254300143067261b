"""A mail job queue on PostgreSQL.

For applications: mailqueue.enqueue and mailqueue.enqueue_many (mail in from
Python, docs/python.md); mailqueue.django.EmailBackend for Django. The rest is
the code consumer.py, producer.py and `python -m mailqueue` share.
"""

from mailqueue.enqueuing import enqueue, enqueue_many

__all__ = ["enqueue", "enqueue_many"]
