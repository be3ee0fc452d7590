"""Collection: modules of optional extras are doctested only where the extra is installed."""

from __future__ import annotations

import importlib.util

collect_ignore = []
if importlib.util.find_spec("lightning") is None:
    collect_ignore.append("src/gradwatch/integrations/lightning.py")
