"""Shared code of consumer.py and producer.py: config, db, mail, addresses, doorbell."""
