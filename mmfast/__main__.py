"""python -m mmfast: prints mmfast.show_config()."""

from mmfast.config import show_config

show_config()
