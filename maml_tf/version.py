"""The package's version, in a module of its own so that any module can name it without
importing the package's public API (``maml_tf/__init__.py``)."""

VERSION = "0.1.0"
