"""The admin API, mounted by ``app.py`` at ``/admin``."""

from modelfence.admin.api import create_admin_app

__all__ = ["create_admin_app"]
