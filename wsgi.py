"""WSGI entry point: `gunicorn wsgi:app`."""
from token_exchange import create_app

app = create_app()
