"""Celery side of slaq: the app factory, queues and routes, tickets, and the thin tasks.

Importing this package (or :mod:`slaq.tasks.tickets`) pulls in no torch: the web process sends
tickets by task name; only GPU workers import :mod:`slaq.tasks.inference`.
"""
