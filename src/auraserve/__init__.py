"""auraserve: a self-hosted text-to-image API for the open AuraFlow model."""

__version__ = "0.1.0"
